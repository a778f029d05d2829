"""``quantize_directory``: an exported fp32 model directory → a quantized one, behind a quality gate.

Steps: rewrite the graph's weights (``rewrite``) with a scheme (``schemes``), taking a GGUF file's
own blocks where they fit (``gguf_blocks``); score the evaluation text with the fp32 directory and
with the new graph, both through lmrt's runtime; refuse the result when perplexity rose more than
the gate allows. An encoder (task "embed" or "classify") is quantized by ``token_int8`` instead and
measured by ``encoder_gate``. The output is written beside its target and renamed into place only
at the end.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections import Counter
from typing import Callable

from ..progress import to_stderr
from ..runtime.compat import Profile, allows, requirement_record, resolve_target
from ..runtime.manifest import Manifest, load_manifest
from ..runtime.model_dir import DATA_FILE, GRAPH_FILE, check_target, remove_leftovers, staged_directory
from .errors import QualityGateError, QuantizeError
from .encoder_gate import EncoderGate
from .evaltext import read_text
from .gate import PerplexityGate
from .gguf_file import gguf_problem
from .graph_file import save_quantized
from .schemes import Scheme
from .token_int8 import write_encoder_int8


def quantize_directory(
    source_dir: str,
    output: str,
    scheme: Scheme,
    gguf: str | None = "auto",
    eval_text: str | None = None,
    eval_tokens: int = 2048,
    max_increase: float | None = None,
    allow_degraded: bool = False,
    force: bool = False,
    progress: Callable[[str], None] = to_stderr,
    target: Profile | str | None = None,
) -> Manifest:
    """Quantize the fp32 model in ``source_dir`` into ``output``.

    ``gguf``: a GGUF file whose blocks are carried over where they fit (see ``gguf_blocks``); "auto" uses
    the directory's own source when it was exported from a GGUF file that still exists; None never.
    ``max_increase``: the gate, as a fraction (0.02 = +2 % perplexity); defaults to the scheme's.
    ``target``: the export profile (or its name) whose onnxruntime must run the result: forms it
    lacks are written with plainer operators; None: the installed onnxruntime's profile.
    Every option is checked before any weight is read; what an interrupted run for the same
    ``output`` left behind is removed.
    """
    manifest = load_manifest(source_dir)
    if manifest.quantization:
        raise QuantizeError(f"{source_dir} is already quantized ({manifest.quantization.get('name')}); start from an fp32 export")
    if manifest.lora is not None:
        raise QuantizeError(f"{source_dir} has LoRA adapters; quantize the model without them, then add them to the result")
    if manifest.graph.dtype != "float32":
        raise QuantizeError(f"{source_dir} holds a {manifest.graph.dtype} graph; quantization starts from float32")
    if os.path.realpath(source_dir) == os.path.realpath(output):
        raise QuantizeError("the output must be a different directory from the source")
    output = check_target(output, force, sources=[source_dir])
    allow, base_forms = _target_forms(target, manifest, source_dir)
    if manifest.task == "generate":
        limit = check_gate(scheme, max_increase, eval_text)
        gguf_path = _gguf_path(gguf, manifest)
        gate = PerplexityGate(source_dir, manifest, eval_text, eval_tokens, limit)  # a bad text fails here, early

        def write(out_dir: str, recurrent_compute: str | None = None) -> dict:
            return _write_quantized(source_dir, out_dir, manifest, scheme, gguf_path, progress, allow, recurrent_compute)
    else:
        check_encoder_options(scheme, gguf, max_increase)
        gate = EncoderGate(source_dir, manifest, eval_text)

        def write(out_dir: str) -> dict:
            return write_encoder_int8(source_dir, out_dir, manifest, progress, allow)
    remove_leftovers(output, progress)

    with staged_directory(output) as tmp:

        def measured(record: dict) -> tuple[Manifest, dict, str]:
            forms = {**base_forms, **record.pop("forms")}
            requires = requirement_record(forms, base_forms, allow.profile)
            quantized = dataclasses.replace(manifest, quantization=record, requires=requires)
            quantized.write(tmp)
            progress(f"… measuring quality ({gate.what}, fp32 vs {scheme.name})")
            started = time.perf_counter()
            quality = gate.measure(tmp, quantized)
            quality["allowed_degraded"] = False
            progress(f"  {time.perf_counter() - started:.1f}s")
            return quantized, quality, gate.summary(quality, scheme.name)

        quantized, quality, summary = measured(write(tmp))
        if not quality["passed"] and quantized.quantization.get("recurrent_compute") == "int8":
            # the LSTM's 8-bit activations cost the most; its 8-bit matrices computed in float may pass
            progress(f"… {summary}, {gate.limit_text}: the LSTM matrices dequantized to float compute instead")
            missed = summary
            for name in (GRAPH_FILE, DATA_FILE):  # onnx appends to a data file that is there
                if os.path.exists(os.path.join(tmp, name)):
                    os.remove(os.path.join(tmp, name))
            quantized, quality, summary = measured(write(tmp, "float"))
            quantized.quantization["recurrent_int8_compute"] = f"missed the gate: {missed}"
        if not quality["passed"]:
            if not allow_degraded:
                raise QualityGateError(
                    f"quality gate failed: {summary}, {gate.limit_text}; nothing was written "
                    "(--allow-degraded keeps it anyway)"
                )
            quality["allowed_degraded"] = True
            progress(f"warning: {summary} is {gate.limit_text}; kept because of --allow-degraded")
        quantized = dataclasses.replace(quantized, quality=quality)
        quantized.write(tmp)
    progress(f"quantized to {output}: {summary}")
    return quantized


class _Allow:
    """Whether the target profile's onnxruntime runs a form of ``rewrite.ONNXRUNTIME_SINCE``."""

    def __init__(self, profile: Profile):
        self.profile = profile

    def __call__(self, form: str) -> bool:
        from .rewrite import ONNXRUNTIME_SINCE

        return allows(self.profile, ONNXRUNTIME_SINCE[form])


def _target_forms(target: Profile | str | None, manifest: Manifest, source_dir: str) -> tuple[_Allow, dict[str, str]]:
    """The target's ``allow`` and the source graph's own forms, once the target runs those."""
    try:
        profile = target if isinstance(target, Profile) else resolve_target(target)
    except ValueError as e:
        raise QuantizeError(str(e)) from None
    base = dict((manifest.requires or {}).get("forms") or {})
    missing = sorted(f for f, since in base.items() if not allows(profile, since))
    if missing:
        raise QuantizeError(
            f"{source_dir} uses {', '.join(missing)}, which target {profile.name} ({profile.onnxruntime}) lacks; "
            f"choose a newer --target, or export the model with --target {profile.name} first"
        )
    return _Allow(profile), base


def check_gate(scheme: Scheme, max_increase: float | None, eval_text: str | None) -> float:
    """The gate's limit (``max_increase``, or the scheme's), once it and the evaluation text are
    known to be usable; export checks these too, before it loads anything."""
    limit = scheme.max_increase if max_increase is None else max_increase
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not (math.isfinite(limit) and limit >= 0):
        raise QuantizeError(f"the allowed perplexity increase must be a finite fraction, 0 or more; got {limit!r}")
    if eval_text is not None:
        read_text(eval_text, "the evaluation text")
    return float(limit)


def check_encoder_options(scheme: Scheme, gguf: str | None, max_increase: float | None) -> None:
    """Encoders take int8 with integer compute and the encoder gate; refuse what does not apply."""
    if scheme.name != "int8" or scheme.compute != "int8":
        raise QuantizeError("encoders are quantized with --int8 only (integer compute)")
    if gguf not in (None, "auto"):
        raise QuantizeError("GGUF blocks apply to decoders; an encoder takes no --gguf")
    if max_increase is not None:
        raise QuantizeError(
            "--max-ppl-increase applies to decoders; an encoder's gate is cosine similarity or label agreement"
        )


def _gguf_path(gguf: str | None, manifest: Manifest) -> str | None:
    if gguf == "auto":
        p = manifest.provenance
        source = p.get("source")
        if p.get("source_kind") == "gguf" and isinstance(source, str) and os.path.isfile(source):
            problem = gguf_problem(source)
            if problem:
                raise QuantizeError(f"{problem}; pass --no-gguf-blocks to quantize from the float weights")
            return source
        return None
    problem = gguf and gguf_problem(gguf)
    if problem:
        raise QuantizeError(problem)
    return gguf


RECURRENT_WEIGHTS = {  # how the record's "weights" names an LSTM's matrices (quantize/recurrent.py)
    "int8": ", DynamicQuantizeLSTM (LSTM matrices, 8-bit rows)",
    "float": ", LSTM matrices in 8-bit rows, dequantized to float when the session loads",
}


def _write_quantized(source_dir: str, out_dir: str, manifest: Manifest, scheme: Scheme, gguf_path, progress, allow, recurrent_compute=None) -> dict:
    import onnx

    from .gguf_blocks import GGUFBlocks
    from .recurrent import quantize_recurrent
    from .rewrite import fallback_note, quantize_graph

    blocks = None
    if gguf_path:
        progress(f"… reading the quantized blocks of {os.path.basename(gguf_path)}")
        blocks = GGUFBlocks(gguf_path)
    progress(f"… quantizing weights ({scheme.name})")
    model = onnx.load(os.path.join(source_dir, manifest.graph.file))
    kept: Counter[str] = Counter()
    kept_weights: dict[str, str] = {}  # weight -> its GGUF types and the layout they are kept in
    requantized: dict[str, str] = {}  # weight -> why the file's blocks are not kept

    def choose(kind: str, name: str, w):
        bits = scheme.bits if kind == "linear" else scheme.head_bits
        if blocks is not None:
            match = blocks.find(w, bits)
            # a tied table is also gathered, and the gather takes integer zero points only
            if match.blocks is not None and kind != "linear" and match.blocks.zero_point_kind == "float":
                match.blocks, match.reason = None, "its float zero points cannot be gathered (tied embeddings)"
            if match.blocks is not None:
                kept[f"{kind} ({match.kinds})"] += 1
                kept_weights[name] = match.how
                return match.blocks
            requantized[name] = f"{match.kinds}: {match.reason}" if match.kinds else match.reason
        return scheme.quantize(kind, w)

    counts = quantize_graph(model, choose, scheme.accuracy_level, manifest.graph.io.input_ids, allow)
    recurrent = quantize_recurrent(model, counts, allow, recurrent_compute or scheme.compute)
    save_quantized(model, out_dir, source_dir, manifest, progress)
    del model
    return {
        **scheme.describe(),
        "weights": "MatMulNBits (linear, lm_head), GatherBlockQuantized (token embeddings)"
        + RECURRENT_WEIGHTS.get(recurrent, "")
        + fallback_note(counts["forms"]),
        **({"recurrent_compute": recurrent} if recurrent else {}),
        "quantized": dict(counts["quantized"]),
        "left_in_float": {**dict(counts["float"]), "norms, biases, rotary tables": "all"},
        "gguf_blocks_kept": dict(kept),
        "gguf_blocks": {"kept": kept_weights, "requantized": requantized},
        "gguf_source": os.path.basename(gguf_path) if gguf_path else None,
        "forms": counts["forms"],
    }
