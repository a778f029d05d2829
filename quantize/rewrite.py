"""Rewrite an exported fp32 graph so its weights are block-quantized.

Three kinds of weight are found by the shape of the graph, not by name:
  linear     MatMul(x, W [K, N])                        -> MatMulNBits
  lm_head    Gemm(x, W [vocab, hidden], transB=1)       -> MatMulNBits
  embedding  Gather(W [vocab, hidden], input_ids)       -> GatherBlockQuantized (+ Reshape)
With tied embeddings the lm_head and the embedding share one quantized table.
What to do with each weight is the caller's ``choose(kind, name, W [N, K]) -> BlockQuantized | None``
(None leaves it in float).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .blocks import BlockQuantized

MS_DOMAIN = "com.microsoft"
# The oldest onnxruntime release whose CPU provider runs what this rewrite writes (measured as for
# export.graph.ONNXRUNTIME_SINCE; 1.19 is the oldest the decoder graphs themselves run on).
ONNXRUNTIME_SINCE: dict[str, str] = {
    "MatMulNBits.4bit": "1.18",
    "MatMulNBits.8bit": "1.22",  # accuracy level 4 (int8 compute); 1.22 rejects level 0 (float compute)
    "MatMulNBits.8bit.float_compute": "1.23",
    "GatherBlockQuantized.8bit": "1.23",  # 1.20 to 1.22 reject 8-bit tables, older ones the operator
    "GatherBlockQuantized.4bit": "1.23",  # no shipped scheme writes it (embeddings stay 8-bit): not measured older
    "DynamicQuantizeLSTM.8bit": "1.19",  # quantize/recurrent.py; a contrib operator older than every supported release
}
Choose = Callable[[str, str, np.ndarray], "BlockQuantized | None"]
# Whether a form of ONNXRUNTIME_SINCE may be written (the export profile's choice); where it may not,
# 8-bit weights take plainer operators that every supported release runs:
#   MatMulNBits 8-bit          -> codes dequantized by Cast, Sub, Mul into a float matrix, then MatMul
#                                 (onnxruntime folds these constants once, when the session starts:
#                                 the file keeps 8 bits, memory and speed are those of fp32)
#   GatherBlockQuantized 8-bit -> Gather of the codes, scales (and zero points), then Cast, Sub, Mul
FALLBACK_SINCE = "1.14"  # the plain operators above
Allow = Callable[[str], bool]


@dataclass
class _Packed:
    """Initializer names of one quantized weight."""

    blocks: BlockQuantized  # integer zero points (or none) only
    codes: str
    scales: str
    zero_points: str = ""
    offsets: str = ""  # [blocks, N] float: what float zero points add, applied to the input's block sums


def quantize_graph(
    model: onnx.ModelProto, choose: Choose, accuracy_level: int, input_ids: str, allow: Allow | None = None
) -> dict:
    """Rewrite ``model`` in place; returns how many weights of each kind were quantized and left in
    float ({"quantized": Counter(kind), "float": Counter(kind)}), and under "forms" the operator
    forms written ({form: oldest onnxruntime}, fallbacks included). ``allow(form)`` says whether a
    form of ``ONNXRUNTIME_SINCE`` may be written (default: every one)."""
    allow = allow or (lambda form: True)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    done: dict[str, _Packed | None] = {}  # weight name -> its quantized form
    new_inits: list[onnx.TensorProto] = []
    counts: dict = {"quantized": Counter(), "float": Counter(), "forms": {}}

    def use(form: str) -> bool:
        """Record ``form`` when allowed (True), else its fallback (False)."""
        if allow(form):
            counts["forms"][form] = ONNXRUNTIME_SINCE[form]
            return True
        counts["forms"][form + ".fallback"] = FALLBACK_SINCE
        return False

    def add(array: np.ndarray, name: str) -> str:
        new_inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def quantized(kind: str, name: str, w: np.ndarray) -> _Packed | None:  # w [N, K]
        if name in done:
            return done[name]
        q = choose(kind, name, w)
        counts["float" if q is None else "quantized"][kind] += 1
        if q is None:
            done[name] = None
            return None
        offsets = ""
        if q.zero_point_kind == "float":
            # (c - z) * s == (c - mid) * s + (mid - z) * s: integer codes around the midpoint plus a
            # per-block offset on the input's block sums. Exact, and it keeps onnxruntime's fast
            # integer kernels, which take no float zero points.
            offsets = add((q.scales * (q.midpoint - q.zero_points)).T.astype(np.float32), f"{name}.offsets")
            q = BlockQuantized(q.bits, q.block_size, q.codes, q.scales, None)
        zp = q.packed_zero_points()
        done[name] = _Packed(
            blocks=q,
            codes=add(q.packed_codes(), f"{name}.q{q.bits}"),  # uint8 [N, blocks, blob]
            scales=add(q.scales.reshape(-1).astype(np.float32), f"{name}.scales"),  # [N * blocks]
            zero_points=add(zp, f"{name}.zero_points") if zp is not None else "",
            offsets=offsets,
        )
        return done[name]

    def block_sums(k: int, block_size: int) -> str:
        """Initializer [K, blocks] of ones where row k lies in block b: a @ it sums a per block."""
        name = f"block_sums.{k}x{block_size}"
        if name not in {t.name for t in new_inits}:
            add(np.kron(np.eye(k // block_size, dtype=np.float32), np.ones((block_size, 1), np.float32)), name)
        return name

    def block_tensor(p: _Packed, what: str) -> str:
        """Initializer float32 [N, blocks, 1] of the weight's scales or zero points (the midpoint
        when it has none), shaped to broadcast over its codes [N, blocks, block_size]."""
        name = f"{p.codes}.block_{what}"
        if name not in {t.name for t in new_inits}:
            q = p.blocks
            values = q.scales if what == "scales" else (q.zero_points if q.zero_points is not None else np.full(q.scales.shape, q.midpoint))
            add(np.asarray(values, np.float32)[..., None], name)
        return name

    def dequantized_matmul(node: onnx.NodeProto, a: str, p: _Packed, bias: str = "") -> list[onnx.NodeProto]:
        """y = a @ W' + bias with W dequantized from its 8-bit codes by plain operators."""
        if p.blocks.bits != 8 or p.offsets:
            raise ValueError("only 8-bit blocks with integer zero points have a plain-operator fallback")
        n, k = p.blocks.shape
        y, w = node.output[0], p.codes + ".dequantized"
        if w not in dequantized:
            dequantized.add(w)
            fallback_nodes.extend([
                helper.make_node("Cast", [p.codes], [w + ".codes"], to=onnx.TensorProto.FLOAT),
                helper.make_node("Sub", [w + ".codes", block_tensor(p, "zero_points")], [w + ".centred"]),
                helper.make_node("Mul", [w + ".centred", block_tensor(p, "scales")], [w + ".blocks"]),
                helper.make_node("Reshape", [w + ".blocks", add(np.array([n, k], np.int64), w + ".shape")], [w + ".nk"]),
                helper.make_node("Transpose", [w + ".nk"], [w], perm=[1, 0]),
            ])  # fmt: skip
        out = [helper.make_node("MatMul", [a, w], [y + ".matmul" if bias else y], name=node.name)]
        if bias:
            out.append(helper.make_node("Add", [y + ".matmul", bias], [y], name=node.name + "_bias"))
        return out

    fallback_nodes: list[onnx.NodeProto] = []  # the dequantized matrices: constants, placed first
    dequantized: set[str] = set()

    def matmul_nbits(node: onnx.NodeProto, a: str, p: _Packed, bias: str = "") -> list[onnx.NodeProto]:
        n, k = p.blocks.shape
        form = f"MatMulNBits.{p.blocks.bits}bit" + (".float_compute" if p.blocks.bits == 8 and accuracy_level == 0 else "")
        if not use(form):
            return dequantized_matmul(node, a, p, bias)
        inputs = [a, p.codes, p.scales, p.zero_points] + (["", bias] if bias else [])
        while inputs[-1] == "":
            inputs.pop()
        y = node.output[0]
        out = [
            helper.make_node(
                "MatMulNBits", inputs, [y + ".codes" if p.offsets else y], name=node.name, domain=MS_DOMAIN,
                K=k, N=n, bits=p.blocks.bits, block_size=p.blocks.block_size, accuracy_level=accuracy_level,
            )
        ]  # fmt: skip
        if p.offsets:  # y = a @ codes' + (a's block sums [.., blocks]) @ offsets [blocks, N]
            out += [
                helper.make_node("MatMul", [a, block_sums(k, p.blocks.block_size)], [y + ".block_sums"]),
                helper.make_node("MatMul", [y + ".block_sums", p.offsets], [y + ".offsets"]),
                helper.make_node("Add", [y + ".codes", y + ".offsets"], [y]),
            ]
        return out

    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        w = inits.get(node.input[1]) if len(node.input) > 1 else None
        if node.op_type == "MatMul" and w is not None and len(w.dims) == 2:
            entry = quantized("linear", w.name, numpy_helper.to_array(w).T)
            nodes.extend(matmul_nbits(node, node.input[0], entry) if entry else [node])
        elif node.op_type == "Gemm" and w is not None and _attr(node, "transB") == 1 and _plain_gemm(node):
            entry = quantized("lm_head", w.name, numpy_helper.to_array(w))
            bias = node.input[2] if len(node.input) > 2 else ""
            nodes.extend(matmul_nbits(node, node.input[0], entry, bias) if entry else [node])
        else:
            nodes.append(node)

    # Embedding lookups: after the matrices, so a tied table reuses the lm_head's codes.
    out: list[onnx.NodeProto] = []
    for node in nodes:
        table = inits.get(node.input[0]) if node.input else None
        if node.op_type == "Gather" and table is not None and node.input[1] == input_ids and _attr(node, "axis", 0) == 0:
            entry = quantized("embedding", table.name, numpy_helper.to_array(table))
            if entry:
                if use(f"GatherBlockQuantized.{entry.blocks.bits}bit"):
                    out.extend(_gather_block_quantized(node, entry, new_inits))
                else:
                    out.extend(_gather_dequantized(node, entry, block_tensor, new_inits))
                continue
        out.append(node)

    out = fallback_nodes + out
    still_used = Counter(name for node in out for name in node.input)
    kept = [t for t in graph.initializer if still_used[t.name] or t.name not in uses]
    new_inits = [t for t in new_inits if still_used[t.name]]  # a table that is only gathered leaves its MatMulNBits scales unused
    del graph.node[:]
    graph.node.extend(out)
    del graph.initializer[:]
    graph.initializer.extend(kept + [t for t in new_inits if still_used[t.name]])  # an untied table gathers only
    import_contrib_ops(model)
    return counts


def import_contrib_ops(model: onnx.ModelProto) -> None:
    """Make ``model`` import onnxruntime's contrib operator set, once."""
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _gather_block_quantized(node: onnx.NodeProto, p: _Packed, new_inits: list) -> list[onnx.NodeProto]:
    """Gather rows of the codes [vocab, blocks, blob] (shared with the lm_head's MatMulNBits) and
    reshape [batch, seq, blocks, block_size] -> [batch, seq, hidden]."""
    if p.offsets:
        raise ValueError("embeddings with float zero points cannot be gathered; quantize them with integer ones")
    q, codes, zp = p.blocks, p.codes, p.zero_points
    vocab, hidden = q.shape
    scales = numpy_helper.from_array(q.scales[..., None].astype(np.float32), f"{codes}.gather_scales")  # [vocab, blocks, 1]
    shape = numpy_helper.from_array(np.array([0, 0, hidden], np.int64), f"{codes}.gather_shape")
    new_inits.extend([scales, shape])
    inputs = [codes, node.input[1], scales.name]
    if zp:
        if q.bits != 8:
            raise ValueError("4-bit embeddings with zero points are not supported")
        zp_init = numpy_helper.from_array(q.zero_points[..., None].astype(np.uint8), f"{codes}.gather_zero_points")
        new_inits.append(zp_init)
        inputs.append(zp_init.name)
    gathered = node.output[0] + ".blocks"
    return [
        helper.make_node(
            "GatherBlockQuantized", inputs, [gathered], name=node.name, domain=MS_DOMAIN,
            gather_axis=0, quantize_axis=2, block_size=q.block_size, bits=q.bits,
        ),  # fmt: skip
        helper.make_node("Reshape", [gathered, shape.name], list(node.output), name=node.name + "_reshape"),
    ]


def fallback_note(forms: dict[str, str]) -> str:
    """"" or "; plain operators instead of X, Y" for the forms the target lacked."""
    missing = [f[: -len(".fallback")] for f in forms if f.endswith(".fallback")]
    return f"; plain operators instead of {', '.join(missing)}" if missing else ""


def _gather_dequantized(node: onnx.NodeProto, p: _Packed, block_tensor, new_inits: list) -> list[onnx.NodeProto]:
    """GatherBlockQuantized's work in plain operators: gather the rows of the codes [vocab, blocks,
    block_size], their scales and zero points, dequantize, reshape to [batch, seq, hidden]."""
    if p.offsets or p.blocks.bits != 8:
        raise ValueError("only 8-bit embeddings with integer zero points have a plain-operator fallback")
    ids, y, hidden = node.input[1], node.output[0], p.blocks.shape[1]
    shape = f"{p.codes}.gather_shape"
    new_inits.append(numpy_helper.from_array(np.array([0, 0, hidden], np.int64), shape))
    return [
        helper.make_node("Gather", [p.codes, ids], [y + ".codes"], name=node.name, axis=0),
        helper.make_node("Gather", [block_tensor(p, "scales"), ids], [y + ".scales"], axis=0),
        helper.make_node("Gather", [block_tensor(p, "zero_points"), ids], [y + ".zero_points"], axis=0),
        helper.make_node("Cast", [y + ".codes"], [y + ".float"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Sub", [y + ".float", y + ".zero_points"], [y + ".centred"]),
        helper.make_node("Mul", [y + ".centred", y + ".scales"], [y + ".blocks"]),
        helper.make_node("Reshape", [y + ".blocks", shape], [y], name=node.name + "_reshape"),
    ]


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _plain_gemm(node: onnx.NodeProto) -> bool:
    """alpha 1, no transposed A: a Gemm that is just x @ W.T (+ C)."""
    return _attr(node, "alpha", 1.0) == 1.0 and _attr(node, "beta", 1.0) == 1.0 and not _attr(node, "transA", 0)
