"""``quantize_directory``: an exported fp32 model directory → a quantized one, behind a quality gate.

Steps: rewrite the graph's weights (``rewrite``) with a scheme (``schemes``), taking a GGUF file's
own blocks where they fit (``gguf_blocks``); score the evaluation text with the fp32 directory and
with the new graph, both through lmrt's runtime; refuse the result when perplexity rose more than
the gate allows. The output is written beside its target and renamed into place only at the end.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from collections import Counter
from typing import Callable

from ..atomic import check_target, remove_leftovers, save_graph, staged_directory
from ..progress import to_stderr
from ..runtime.manifest import Manifest, load_manifest
from .errors import QualityGateError, QuantizeError
from .evaltext import read_text
from .gate import eval_ids, measure_quality
from .gguf_file import gguf_problem
from .schemes import Scheme


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
) -> Manifest:
    """Quantize the fp32 model in ``source_dir`` into ``output``.

    ``gguf``: a GGUF file whose blocks are carried over where they fit (see ``gguf_blocks``); "auto" uses
    the directory's own source when it was exported from a GGUF file that still exists; None never.
    ``max_increase``: the gate, as a fraction (0.02 = +2 % perplexity); defaults to the scheme's.
    Every option is checked before any weight is read; what an interrupted run for the same
    ``output`` left behind is removed.
    """
    manifest = load_manifest(source_dir)
    if manifest.quantization:
        raise QuantizeError(f"{source_dir} is already quantized ({manifest.quantization.get('name')}); start from an fp32 export")
    if manifest.graph.dtype != "float32":
        raise QuantizeError(f"{source_dir} holds a {manifest.graph.dtype} graph; quantization starts from float32")
    if os.path.realpath(source_dir) == os.path.realpath(output):
        raise QuantizeError("the output must be a different directory from the source")
    output = check_target(output, force, sources=[source_dir])
    limit = check_gate(scheme, max_increase, eval_text)
    gguf_path = _gguf_path(gguf, manifest)
    ids, text_name = eval_ids(source_dir, manifest, eval_text, eval_tokens)  # a bad text fails here, early
    remove_leftovers(output, progress)

    with staged_directory(output) as tmp:
        record = _write_quantized(source_dir, tmp, manifest, scheme, gguf_path, progress)
        quantized = dataclasses.replace(manifest, quantization=record)
        quantized.write(tmp)
        progress(f"… measuring quality (perplexity, fp32 vs {scheme.name})")
        started = time.perf_counter()
        quality = measure_quality(source_dir, tmp, quantized, ids, text_name)
        quality.update(max_increase=limit, passed=quality["increase"] <= limit, allowed_degraded=False)
        progress(f"  {time.perf_counter() - started:.1f}s")
        summary = (
            f"perplexity {quality['perplexity_reference']:.3f} (fp32) -> {quality['perplexity']:.3f} ({scheme.name}), "
            f"{quality['increase']:+.2%}; top-1 agreement {quality['top1_agreement']:.1%} over {quality['positions']} positions"
        )
        if not quality["passed"]:
            if not allow_degraded:
                raise QualityGateError(
                    f"quality gate failed: {summary}, above the allowed +{limit:.1%}; nothing was written "
                    "(--allow-degraded keeps it anyway)"
                )
            quality["allowed_degraded"] = True
            progress(f"warning: {summary} is above the allowed +{limit:.1%}; kept because of --allow-degraded")
        quantized = dataclasses.replace(quantized, quality=quality)
        quantized.write(tmp)
    progress(f"quantized to {output}: {summary}")
    return quantized


def check_gate(scheme: Scheme, max_increase: float | None, eval_text: str | None) -> float:
    """The gate's limit (``max_increase``, or the scheme's), once it and the evaluation text are
    known to be usable; export checks these too, before it loads anything."""
    limit = scheme.max_increase if max_increase is None else max_increase
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not (math.isfinite(limit) and limit >= 0):
        raise QuantizeError(f"the allowed perplexity increase must be a finite fraction, 0 or more; got {limit!r}")
    if eval_text is not None:
        read_text(eval_text, "the evaluation text")
    return float(limit)


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


def _write_quantized(source_dir: str, out_dir: str, manifest: Manifest, scheme: Scheme, gguf_path, progress) -> dict:
    import onnx

    from .gguf_blocks import GGUFBlocks
    from .rewrite import quantize_graph

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

    counts = quantize_graph(model, choose, scheme.accuracy_level, manifest.graph.io.input_ids)
    progress("… writing the graph")
    save_graph(model, out_dir)
    del model
    shutil.copy(os.path.join(source_dir, manifest.tokenizer.file), out_dir)
    return {
        **scheme.describe(),
        "weights": "MatMulNBits (linear, lm_head), GatherBlockQuantized (token embeddings)",
        "quantized": dict(counts["quantized"]),
        "left_in_float": {**dict(counts["float"]), "norms, biases, rotary tables": "all"},
        "gguf_blocks_kept": dict(kept),
        "gguf_blocks": {"kept": kept_weights, "requantized": requantized},
        "gguf_source": os.path.basename(gguf_path) if gguf_path else None,
    }
