"""int8 for encoders: every MatMul with a weight becomes an integer matrix product whose activations
are quantized per token at run time.

    W [K, N]  -> int8 codes in -126 .. 126 (8 bits), symmetric, one scale per output column (w_scale [N])
    x [.., K] -> per row (token): lo = min(x, 0), hi = max(x, 0), scale = (hi - lo) / 255,
                 zero point z = round(-lo / scale), x_q = QuantizeLinear(x, scale, z): uint8
    y = scale * (MatMulIntegerToFloat(x_q, W_q, 1, w_scale) - z * (column sums of W_q * w_scale))

onnxruntime's integer products take one zero point for the whole left matrix, so each row's own
zero point is taken out afterwards through the column sums: MatMulIntegerToFloat writes the product
already in float and scaled by column, one Gemm of the zero points [M, 1] by the scaled column sums
[1, N] subtracts the correction as it reads that product, and one Mul applies the row scales (the
plain MatMulInteger, Cast, Sub and Mul chain takes twice as many passes over the [M, N] product and
measured slower: docs/benchmarks.md). The directory keeps 8-bit codes, exact where the CPU adds
uint8 x int8 products in 32 bits (VNNI, Arm); on x86 CPUs without VNNI, onnxruntime's kernel adds
pairs of products in 16 bits, which saturate when both codes are near full scale
(255 * 127 * 2 > 32767), and the runtime halves the codes into 7 bits in memory when it loads the
directory (runtime/int8_codes.py, which names the three initializers each projection keeps).
The 8-bit codes are chosen for that: the step is half the 7-bit one (max |w| / 126), each weight
takes its nearest code unless halving that code (ties to even) would not give the weight's nearest
7-bit code, in which case it takes that 7-bit code doubled; so the 7-bit path computes exactly what
a 7-bit directory computes, and the 8-bit path is closer to fp32 than it (docs/benchmarks.md).
Directories written before kept 7-bit codes (-63 .. 63) and say nothing of their code bits. An
encoder sends its whole batch through
each MatMul at once, and there these integer kernels were measured much faster than MatMulNBits,
whose kernels are built for a decoder's few rows; per-token ranges were measured far closer to fp32
than the per-tensor ranges of onnxruntime's DynamicQuantizeMatMul, and they keep each text's
result independent of the texts batched beside it (docs/benchmarks.md).

The token embedding table is quantized as for decoders (GatherBlockQuantized, 8-bit blocks); a
classification head (Gemm) stays in float: it is tiny, and its logits are the most sensitive output.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..runtime.int8_codes import CODE_BITS_KEY, CODES_SUFFIX, SCALES_SUFFIX, SUMS_SUFFIX, halve_codes
from ..runtime.manifest import Manifest
from .blocks import quantize_symmetric
from .graph_file import save_quantized
from .rewrite import MS_DOMAIN, fallback_note, import_contrib_ops, quantize_graph
from .schemes import scheme_for


CODE_BITS = 8  # what a directory stores; the runtime makes 7-bit codes of them where 8 would saturate


class _Nodes:
    """Nodes and initializers added by the rewrite; every helper returns its output's name."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._consts: dict[tuple, str] = {}

    def op(self, op_type: str, *inputs: str, out: str | None = None, domain: str = "", **attrs) -> str:
        out = out or f"token_int8.{len(self.nodes)}.{op_type}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, domain=domain, **attrs))
        return out

    def const(self, value, dtype=np.float32) -> str:
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.add(array, f"token_int8.const.{len(self._consts)}")
        return self._consts[key]

    def add(self, array: np.ndarray, name: str) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name


def column_codes(w_t: np.ndarray, code_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes [N, K] and scales [N] of ``w_t`` [N, K], one scale per row: 7 bits, the
    nearest codes within -63 .. 63; 8 bits, codes on half that step whose halves are the 7-bit codes."""
    q = quantize_symmetric(w_t, 7, block_size=w_t.shape[1])  # one block per output column
    seven = q.codes[:, 0, :].astype(np.int16) - 64  # [N, K] in -63 .. 63
    scales = q.scales[:, 0].astype(np.float32)
    if code_bits == 7:
        return seven.astype(np.int8), scales
    half = scales / 2
    nearest = np.clip(np.rint(w_t / half[:, None]), -126, 126).astype(np.int16)
    eight = np.where(halve_codes(nearest) == seven, nearest, 2 * seven)
    return eight.astype(np.int8), half


def _matmul(g: _Nodes, x: str, w: np.ndarray, name: str, y: str, code_bits: int) -> None:
    """y = x @ w (w [K, N]) with int8 weights and per-token uint8 activations."""
    k, n = w.shape
    codes, w_scale = column_codes(w.T, code_bits)  # [N, K], [N]
    w_q = g.add(np.ascontiguousarray(codes.T), name + CODES_SUFFIX)  # [K, N]
    scaled_sums = (codes.astype(np.float32).sum(axis=1) * w_scale)[None, :]  # [1, N]

    rows = g.op("Reshape", x, g.const([-1, k], np.int64))  # [M, K]
    hi = g.op("Max", g.op("ReduceMax", rows, axes=[1], keepdims=1), g.const(0.0))  # [M, 1]
    lo = g.op("Min", g.op("ReduceMin", rows, axes=[1], keepdims=1), g.const(0.0))
    scale = g.op("Max", g.op("Div", g.op("Sub", hi, lo), g.const(255.0)), g.const(1e-12))  # [M, 1]
    zero = g.op("Round", g.op("Div", g.op("Neg", lo), scale))  # [M, 1], whole numbers in 0 .. 255
    column = g.const([1], np.int64)
    x_q = g.op(
        "QuantizeLinear", rows, g.op("Squeeze", scale, column),
        g.op("Cast", g.op("Squeeze", zero, column), to=TensorProto.UINT8), axis=0,
    )  # uint8 [M, K]  # fmt: skip
    product = g.op(
        "MatMulIntegerToFloat", x_q, w_q, g.const([1.0]), g.add(w_scale, name + SCALES_SUFFIX), domain=MS_DOMAIN
    )  # float [M, N]: the integer product times w_scale  # fmt: skip
    corrected = g.op("Gemm", zero, g.add(scaled_sums, name + SUMS_SUFFIX), product, alpha=-1.0, beta=1.0)
    flat = g.op("Mul", corrected, scale)
    shape = g.op("Concat", g.op("Shape", x, end=-1), g.const([n], np.int64), axis=0)
    g.op("Reshape", flat, shape, out=y)


def quantize_per_token(model: onnx.ModelProto, code_bits: int = CODE_BITS) -> int:
    """Rewrite ``model`` in place: each MatMul(x, W) with W an initializer [K, N] becomes the int8
    product above, its codes within ``code_bits``; returns how many were rewritten."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    g = _Nodes()
    nodes, rewritten = [], 0
    for node in graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if w is None or len(w.dims) != 2:
            nodes.append(node)
            continue
        start = len(g.nodes)
        _matmul(g, node.input[0], numpy_helper.to_array(w).astype(np.float32), w.name, node.output[0], code_bits)
        nodes.extend(g.nodes[start:])
        rewritten += 1
    used = {name for node in nodes for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + g.initializers)
    if rewritten:
        import_contrib_ops(model)
    return rewritten


def write_encoder_int8(source_dir: str, out_dir: str, manifest: Manifest, progress, allow=None) -> dict:
    """Quantize the encoder graph in ``source_dir`` into ``out_dir``; returns the manifest's
    ``quantization`` record."""
    progress("… quantizing weights (int8, activations per token at run time)")
    model = onnx.load(os.path.join(source_dir, manifest.graph.file))
    linear = quantize_per_token(model, CODE_BITS)
    table = scheme_for("int8")  # the embedding table: 8-bit blocks, as for decoders
    counts = quantize_graph(
        model, lambda kind, name, w: table.quantize(kind, w) if kind == "embedding" else None, table.accuracy_level,
        manifest.graph.io.input_ids, allow,
    )  # fmt: skip
    save_quantized(model, out_dir, source_dir, manifest, progress)
    del model
    left = {"norms, biases, position embeddings": "all"}
    if counts["float"]["lm_head"]:
        left["classification head layers"] = counts["float"]["lm_head"]
    return {
        "name": "int8",
        "bits": 8,
        "method": f"int8 weights within {CODE_BITS} bits, symmetric, one scale per output column "
        "(7 bits in memory on CPUs without VNNI)",
        CODE_BITS_KEY: CODE_BITS,
        "activations": "uint8, one scale and zero point per token, computed at run time",
        "embedding_block_size": table.block_size,
        "weights": "MatMulIntegerToFloat (linear), GatherBlockQuantized (token embeddings)" + fallback_note(counts["forms"]),
        "quantized": {"linear": linear, **dict(counts["quantized"])},
        "left_in_float": left,
        "forms": counts["forms"],
    }
