"""Load what ``lmrt export`` is given: a hub id, a local Hugging Face directory or a .gguf file.

All three go through the same transformers calls; only the arguments differ, so the local tests
exercise the hub path too.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from ..runtime.errors import first_line
from .errors import ExportError
from .source_files import hub_reachable, in_hub_cache, load_json

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class Source:
    source: str  # as the user gave it
    kind: str  # "gguf", "directory" or "hub"
    model: Any  # transformers PreTrainedModel, float32, eval mode
    tokenizer: Any  # transformers fast tokenizer


def locate(source: str) -> tuple[str, str, dict[str, Any]]:
    """(kind, path or id for from_pretrained, extra from_pretrained arguments) for ``source``."""
    if source.lower().endswith(".gguf"):
        if not os.path.isfile(source):
            raise ExportError(f"GGUF file not found: {source}")
        path = os.path.abspath(source)
        return "gguf", os.path.dirname(path), {"gguf_file": os.path.basename(path)}
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise ExportError(f"{source} is not a Hugging Face model directory (it has no config.json)")
        return "directory", source, {}
    if os.path.exists(source):
        raise ExportError(f"{source} is neither a model directory nor a .gguf file")
    if not _HUB_ID.match(source):
        raise ExportError(f"{source!r} is not a local path, a .gguf file or a Hugging Face Hub id")
    return "hub", source, {}


def load_source(source: str) -> Source:
    kind, path, extra = locate(source)
    if kind == "gguf":
        from ..quantize.gguf_file import gguf_problem

        problem = gguf_problem(source)  # a file cut short fails here, by name, before the slow imports
        if problem:
            raise ExportError(problem)
    if kind == "hub" and not in_hub_cache(path) and not hub_reachable():
        raise ExportError(
            f"cannot reach the Hugging Face Hub to download {source!r} (offline?); "
            "pass a local model directory or a .gguf file instead"
        )
    check_architecture(source, kind, path, extra)  # before torch is imported or any weight is read
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **extra)
    except (OSError, ValueError) as e:
        if kind == "hub":
            raise ExportError(
                f"could not load {source!r} from the Hugging Face Hub ({first_line(e)}); "
                "if you are offline, pass a local model directory or a .gguf file instead"
            ) from None
        raise ExportError(f"could not load {source}: {first_line(e)}") from None
    require_fast_tokenizer(tokenizer, source)
    model.eval()
    return Source(source=source, kind=kind, model=model, tokenizer=tokenizer)


def require_fast_tokenizer(tokenizer, source: str) -> None:
    """Refuse a source whose tokenizer is not a fast one: the runtime reads its tokenizer.json."""
    if not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "backend_tokenizer"):
        raise ExportError(f"{source} has no fast tokenizer (tokenizer.json), which the runtime needs")


def check_architecture(source: str, kind: str, path: str, extra: dict[str, Any]) -> None:
    """Refuse a model lmrt cannot export, from its config.json or its GGUF header alone."""
    from .architectures import REGISTRY, spec_for, supported_gguf_architectures

    if kind == "gguf":
        architecture = gguf_architecture(os.path.join(path, extra["gguf_file"]))
        if architecture not in supported_gguf_architectures():
            directory_only = sorted(t for t, spec in REGISTRY.items() if not spec.gguf_architectures)
            raise ExportError(
                f"{source}: GGUF architecture {architecture!r} is not supported yet; supported from GGUF: "
                f"{', '.join(supported_gguf_architectures())} (and from a Hugging Face directory: {', '.join(directory_only)})"
            )
        return
    config_file = _config_file(source, kind, path)
    config = load_json(config_file, config_file)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not model_type:
        raise ExportError(f"{source}: config.json names no model_type")
    try:
        spec_for(model_type)
    except ValueError as e:
        raise ExportError(f"{source}: {e}") from None


def gguf_architecture(path: str) -> str:
    """``general.architecture`` from a GGUF file's header (the tensors are not read)."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(path).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except ImportError:
        raise
    except Exception as e:  # a truncated or foreign file: gguf raises many kinds of errors
        raise ExportError(f"cannot read the GGUF file {path}: {first_line(e)}") from None


def _config_file(source: str, kind: str, path: str) -> str:
    if kind == "directory":
        return os.path.join(path, "config.json")
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(path, "config.json")
    except Exception as e:
        raise ExportError(f"could not read the config of {source!r} from the Hugging Face Hub ({first_line(e)})") from None
