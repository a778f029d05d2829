"""Which task a source is exported for, read from its files before anything heavy is imported.

  a sentence-transformers model (modules.json)          -> "embed"
  a *ForSequenceClassification config                   -> "classify"
  another BERT-family encoder (BertModel, BertForMaskedLM, ...) -> "embed", mean pooling,
                                                           as sentence-transformers treats it
  anything else (decoders, GGUF files)                  -> "generate"
"""

from __future__ import annotations

import json
import os

from ..errors import ExportError
from .families import FAMILIES

TASKS = ("generate", "embed", "classify")
MODULES_FILE = "modules.json"  # sentence-transformers' list of the model's modules


def read_json(source: str, name: str) -> dict | list | None:
    """``name`` from a local directory, or from a hub id's files when the hub (or its cache) has
    them; None when there is no such file."""
    if os.path.isdir(source):
        path = os.path.join(source, name)
    elif source.lower().endswith(".gguf") or os.path.exists(source):
        return None
    else:
        path = _hub_file(source, name)
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read {name} of {source}: {e}") from None


def _hub_file(repo_id: str, name: str) -> str | None:
    try:
        from huggingface_hub import hf_hub_download

        from ..source import _cached, _hub_reachable

        if not (_cached(repo_id) or _hub_reachable()):
            return None
        return hf_hub_download(repo_id, name)
    except Exception:  # no such file, no such repository, offline: loading reports the real problem
        return None


def detect_task(source: str, requested: str | None = None) -> str:
    """The task to export ``source`` for: ``requested`` when given (checked against what the source
    can do), otherwise detected from its files."""
    if requested is not None and requested not in TASKS:
        raise ExportError(f"unknown task {requested!r}; choose one of {', '.join(TASKS)}")
    config = read_json(source, "config.json")
    model_type = config.get("model_type") if isinstance(config, dict) else None
    encoder = model_type in FAMILIES
    if requested in ("embed", "classify") and config is None:
        raise ExportError(f"--task {requested} needs a BERT-family encoder with a config.json; found none for {source}")
    if requested in ("embed", "classify") and not encoder:
        raise ExportError(
            f"--task {requested} needs a BERT-family encoder ({', '.join(sorted(FAMILIES))}); "
            f"{source} is a {model_type!r} model"
        )
    if requested == "generate" and encoder:
        raise ExportError(f"{source} is an encoder ({model_type}); export it with --task embed or --task classify")
    if requested is not None:
        return requested
    if not encoder:
        return "generate"
    if read_json(source, MODULES_FILE) is not None:
        return "embed"
    if any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        return "classify"
    return "embed"
