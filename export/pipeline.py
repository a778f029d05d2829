"""``export_model``: source → ONNX graph + tokenizer + manifest, validated, written atomically."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

import numpy as np

from .. import __version__
from ..progress import to_stderr
from ..quantize.graph_file import save_graph
from ..runtime.compat import Profile, allows, resolve_target
from ..runtime.manifest import Graph, GraphIO, Manifest, TokenizerInfo
from ..runtime.model_dir import DATA_FILE, GRAPH_FILE, TOKENIZER_FILE, check_target, remove_leftovers
from .architectures import Weights, spec_for
from .encoders.task import detect_task
from .errors import ExportError
from .graph import ONNXRUNTIME_SINCE, OPSET, DecoderGraph, GraphBuilder
from .source import Source, load_source, locate
from .stages import Steps, provenance, record_validation, write_model
from .validate import probe_ids, validate

DEFAULT_TOLERANCE = 1e-3  # largest logit difference allowed, relative to the largest logit
PRECISIONS = ("fp32", "fp16", "int8", "int4")
FP16_TOLERANCE = 2e-2  # fp16 keeps about 3 significant digits


def export_model(
    source: str | Source,
    output: str,
    force: bool = False,
    tolerance: float | None = None,
    progress: Callable[[str], None] = to_stderr,
    precision: str = "fp32",
    task: str | None = None,
    target: str | None = None,
    tokenizer: Any = None,
    max_length: int | None = None,
    weights: str | None = None,
    state: Any = None,
    **quantize_options: Any,
) -> Manifest:
    """Export ``source`` (hub id, Hugging Face directory or .gguf file, or a ``Source`` already
    loaded with ``load_source``; or an ``nn.Module`` of your own, with its ``tokenizer``: a
    tokenizer.json path, a tokenizers.Tokenizer, a transformers tokenizer or a list of tokens, see
    docs/own-models.md; ``max_length`` caps its sequences; ``state`` declares the state a module with
    ``forward(ids, state) -> (logits, new_state)`` carries ({name: (kind, per-row shape)}, or
    "infer"); or "path/to/model.py:make_model" with
    ``weights``, a state_dict file, to build it; or a ``torch.export.ExportedProgram`` or the
    ".pt2" file ``torch.export.save`` wrote, exported with dynamic batch and sequence sizes) into the
    directory ``output``.

    ``precision``: "fp32"; "fp16" (a float16 graph, for GPU providers); "int8" or "int4" (the fp32
    export, validated, then quantized behind the quality gate; ``quantize_options`` go to
    ``lmrt.quantize.quantize_directory``: max_increase, allow_degraded, eval_text, compute).
    ``task``: "generate", "embed" or "classify" (``lmrt.export.encoders``); detected when None.
    ``target``: an export profile (``lmrt.runtime.compat.PROFILES``: "ort-1.19", ..., "latest"); the
    graph uses only the operator forms that release runs. None: the installed onnxruntime's profile.

    Nothing is left at ``output`` unless the whole export, validation included, succeeds; an existing
    ``output`` is replaced only with ``force``, and only when it is an lmrt model directory. Every
    option is checked before the source is loaded. What an interrupted export to the same ``output``
    left behind is removed."""
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if tolerance is None:
        tolerance = FP16_TOLERANCE if precision == "fp16" else DEFAULT_TOLERANCE
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance > 0):
        raise ExportError(f"tolerance must be a positive number, got {tolerance}")
    try:
        profile = resolve_target(target)
    except ValueError as e:
        raise ExportError(str(e)) from None
    from .own.factory import is_module_source

    named = isinstance(source, (str, os.PathLike)) and is_module_source(os.fspath(source))  # model.py:make_model
    own = named or not isinstance(source, (str, os.PathLike, Source))  # a module of the caller's (export/own)
    if own and (precision == "fp16" or task not in (None, "generate")):
        raise ExportError("a module of your own is exported to generate, as fp32, int8 or int4")
    if not own and (tokenizer is not None or max_length is not None or weights is not None or state is not None):
        raise ExportError("tokenizer, max_length, weights and state apply to a module; a Hugging Face or GGUF source brings its own")
    if weights is not None and not named:
        raise ExportError("weights go with a module named as path/to/model.py:make_model; load them into your module yourself")
    source_path = "" if own else source.source if isinstance(source, Source) else os.fspath(source)
    output = check_target(output, force, sources=[source_path] if source_path and os.path.exists(source_path) else [])
    if isinstance(source, str) and not own:
        locate(source)  # fail fast on a bad path, before the slow imports
    scheme = None
    if precision in ("int8", "int4"):
        from ..quantize import scheme_for
        from ..quantize.pipeline import check_gate

        scheme = scheme_for(precision)
        if "compute" in quantize_options:
            scheme = dataclasses.replace(scheme, compute=quantize_options.pop("compute"))
        check_gate(scheme, quantize_options.get("max_increase"), quantize_options.get("eval_text"))
    elif quantize_options:
        raise ExportError(f"{', '.join(sorted(quantize_options))} apply to int8 / int4 exports only")
    if own:
        from .own import export_module

        if named:
            from .own.factory import build_module

            source = build_module(os.fspath(source), weights)
        elif type(source).__name__ == "ExportedProgram":  # torch.export.export's (torch not imported for other sources)
            from .own.program import program_module

            source = program_module(source)
        return export_module(source, output, tokenizer, tolerance, progress, scheme, force, profile, max_length, state, **quantize_options)
    task = detect_task(source_path, task)
    remove_leftovers(output, progress)
    if task != "generate":
        from .encoders.pipeline import export_encoder

        return export_encoder(source_path, output, task, force, tolerance, progress, precision, scheme, target=profile, **quantize_options)
    step = Steps(progress)
    if isinstance(source, Source):
        src = source
    else:
        step(f"loading {source}")
        src = load_source(source)
    dtype = np.float16 if precision == "fp16" else np.float32

    def write(out_dir: str) -> Manifest:
        return _write_directory(src, out_dir, tolerance, step, dtype, profile)

    gguf = src.source if src.kind == "gguf" else None
    return write_model(output, write, _summary, step, scheme, gguf=gguf, force=force, target=profile, **quantize_options)


def _summary(manifest: Manifest, where: str) -> str:
    v = manifest.validation
    return (
        f"exported {manifest.architecture.model_type} ({manifest.graph.dtype}) to {where}: "
        f"max |Δlogit| {v['max_abs_diff']:.2e} (relative {v['max_rel_diff']:.2e}), "
        f"greedy agreement {v['greedy_agreement']:.1%}"
    )


def _write_directory(src: Source, out_dir: str, tolerance: float, step: Steps, dtype=np.float32, profile: Profile | None = None) -> Manifest:
    config = src.model.config
    try:
        spec = spec_for(config.model_type)
        arch = spec.describe(config)
    except ValueError as e:
        raise ExportError(str(e)) from None
    name = np.dtype(dtype).name  # "float32" / "float16"
    profile = profile or resolve_target(None)
    # a scratch query row makes speculative checks exact; onnxruntime 1.19 mis-reads such a pass
    io = GraphIO(kv_dtype=name, logits_dtype=name, scratch_positions=int(allows(profile, ONNXRUNTIME_SINCE["GroupQueryAttention.scratch_row"])))

    step(f"building the {arch.family} graph ({arch.num_layers} layers)")
    builder = GraphBuilder(dtype)
    graph = DecoderGraph(builder, arch, io)
    spec.build(graph, config, Weights(src.model), src.model)
    requires = graph.requirement(profile)  # ExportError when the target lacks a form this model needs
    if not graph.uses_position_ids:
        io = dataclasses.replace(io, position_ids="")
    model = builder.build(f"lmrt_{arch.model_type}", producer=f"lmrt {__version__}")

    step("writing the graph")
    save_graph(model, out_dir)
    del model, builder
    src.tokenizer.backend_tokenizer.save(os.path.join(out_dir, TOKENIZER_FILE))

    manifest = Manifest(
        architecture=arch,
        graph=Graph(file=GRAPH_FILE, data_file=DATA_FILE, opset=OPSET, dtype=name, io=io),
        tokenizer=tokenizer_info(src),
        generation_defaults=generation_defaults(src.model.generation_config),
        provenance=provenance(src, tolerance, name),
        requires=requires,
    )
    manifest.write(out_dir)

    step("validating against PyTorch")
    prompt = probe_ids(src.tokenizer, arch.vocab_size, arch.context_length)
    return record_validation(out_dir, manifest, validate(out_dir, manifest, src.model, prompt), tolerance, "logits")


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
