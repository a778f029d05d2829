"""``export_model``: source → ONNX graph + tokenizer + manifest, validated, written atomically."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np

from .. import __version__
from ..runtime.manifest import Graph, GraphIO, Manifest, TokenizerInfo
from .architectures import Weights, spec_for
from .errors import ExportError
from .graph import OPSET, DecoderGraph, GraphBuilder
from .source import Source, load_source, locate
from .validate import probe_ids, validate

GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_TOLERANCE = 1e-3  # largest logit difference allowed, relative to the largest logit


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Steps:
    """Prints each step as it starts and how long the previous one took."""

    def __init__(self, report: Callable[[str], None]):
        self.report, self.started, self.name = report, None, None

    def __call__(self, name: str) -> None:
        self.done()
        self.name, self.started = name, time.perf_counter()
        self.report(f"… {name}")

    def done(self) -> None:
        if self.name:
            self.report(f"  {self.name}: {time.perf_counter() - self.started:.1f}s")
        self.name = None


def export_model(
    source: str | Source,
    output: str,
    force: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    progress: Callable[[str], None] = _stderr,
) -> Manifest:
    """Export ``source`` (hub id, Hugging Face directory or .gguf file, or a ``Source`` already
    loaded with ``load_source``) into the directory ``output``.

    Nothing is left at ``output`` unless the whole export, validation included, succeeds; an existing
    ``output`` is replaced only with ``force``."""
    output = os.path.abspath(output)
    if os.path.exists(output) and not force:
        raise ExportError(f"{output} already exists; pass --force to overwrite it")
    if not tolerance > 0:
        raise ExportError(f"tolerance must be positive, got {tolerance}")
    parent = os.path.dirname(output)
    if isinstance(source, str):
        locate(source)  # fail fast on a bad path, before the slow imports
    os.makedirs(parent, exist_ok=True)
    step = _Steps(progress)
    if isinstance(source, Source):
        src = source
    else:
        step(f"loading {source}")
        src = load_source(source)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.partial-", dir=parent)
    try:
        manifest = _write_directory(src, tmp, tolerance, step)
        step.done()
        _move_into_place(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    v = manifest.validation
    progress(
        f"exported {manifest.architecture.model_type} to {output}: "
        f"max |Δlogit| {v['max_abs_diff']:.2e} (relative {v['max_rel_diff']:.2e}), "
        f"greedy agreement {v['greedy_agreement']:.1%}"
    )
    return manifest


def _write_directory(src: Source, out_dir: str, tolerance: float, step: _Steps) -> Manifest:
    import onnx

    config = src.model.config
    try:
        spec = spec_for(config.model_type)
        arch = spec.describe(config)
    except ValueError as e:
        raise ExportError(str(e)) from None
    io = GraphIO()

    step(f"building the {arch.family} graph ({arch.num_layers} layers)")
    builder = GraphBuilder(np.float32)
    spec.build(DecoderGraph(builder, arch, io), config, Weights(src.model), src.model)
    model = builder.build(f"lmrt_{arch.model_type}", producer=f"lmrt {__version__}")

    step("writing the graph")
    onnx.save_model(
        model,
        os.path.join(out_dir, GRAPH_FILE),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=1024,
    )
    del model, builder
    src.tokenizer.backend_tokenizer.save(os.path.join(out_dir, TOKENIZER_FILE))

    manifest = Manifest(
        architecture=arch,
        graph=Graph(file=GRAPH_FILE, data_file=DATA_FILE, opset=OPSET, dtype="float32", io=io),
        tokenizer=tokenizer_info(src),
        generation_defaults=generation_defaults(src.model.generation_config),
        provenance=provenance(src, tolerance),
    )
    manifest.write(out_dir)

    step("validating against PyTorch")
    prompt = probe_ids(src.tokenizer, arch.vocab_size, arch.context_length)
    result = validate(out_dir, manifest, src.model, prompt)
    result["tolerance"] = tolerance
    result["passed"] = result["max_rel_diff"] <= tolerance
    if not result["passed"]:
        raise ExportError(
            f"validation failed: the ONNX logits differ from PyTorch's by {result['max_rel_diff']:.2e} "
            f"(relative), above the tolerance {tolerance:.0e}; nothing was written"
        )
    manifest = dataclasses.replace(manifest, validation=result)
    manifest.write(out_dir)
    return manifest


def _move_into_place(tmp: str, output: str) -> None:
    """Rename the finished directory to ``output``, replacing an old one only at the very end."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; give it a normal directory's mode
    for name in os.listdir(tmp):
        os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
    if not os.path.exists(output):
        os.rename(tmp, output)
        return
    old = f"{tmp}.old"  # beside it, so the rename stays on one filesystem
    os.rename(output, old)
    os.rename(tmp, output)
    if os.path.isdir(old):
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.remove(old)


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def tokenizer_info(src: Source) -> TokenizerInfo:
    tok, gen = src.tokenizer, src.model.generation_config
    eos = _ids(gen.eos_token_id) + [t for t in _ids(tok.eos_token_id) if t not in _ids(gen.eos_token_id)]
    bos = _ids(gen.bos_token_id) or _ids(tok.bos_token_id)
    pad = _ids(gen.pad_token_id) or _ids(tok.pad_token_id)
    template = getattr(tok, "chat_template", None)
    return TokenizerInfo(
        file=TOKENIZER_FILE,
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=tuple(eos),
        pad_token_id=pad[0] if pad else None,
        chat_template=template if isinstance(template, str) else None,
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
    )


def generation_defaults(gen) -> dict[str, Any]:
    """The source's generation config, in GenerationConfig's terms: sampling settings only when the
    source samples by default (transformers ignores them otherwise)."""
    out: dict[str, Any] = {}
    if getattr(gen, "do_sample", False):
        out["temperature"] = float(gen.temperature if gen.temperature is not None else 1.0)
        out["top_k"] = int(gen.top_k or 0)
        out["top_p"] = float(gen.top_p if gen.top_p is not None else 1.0)
    else:
        out["temperature"] = 0.0
    if gen.repetition_penalty not in (None, 1.0):
        out["repetition_penalty"] = float(gen.repetition_penalty)
    if getattr(gen, "max_new_tokens", None):
        out["max_new_tokens"] = int(gen.max_new_tokens)
    return out


def provenance(src: Source, tolerance: float) -> dict[str, Any]:
    import onnx
    import torch
    import transformers

    return {
        "source": src.source,
        "source_kind": src.kind,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "lmrt_version": __version__,
        "export_options": {"dtype": "float32", "opset": OPSET, "tolerance": tolerance},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__},
    }
