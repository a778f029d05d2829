"""A recurrent step graph's LSTM layers quantized: the input matrix W and the recurrent matrix R
of every LSTM node in 8 bits, symmetric, one scale per output row (the gate unit). With integer
compute the node becomes onnxruntime's ``DynamicQuantizeLSTM``, which also quantizes its
activations to 8 bits as it runs; with float compute (``compute="float"``, a target without that
operator, or an integer LSTM that missed the quality gate: ``pipeline``), the codes are dequantized
into the float LSTM by Cast and Mul, which onnxruntime folds once when the session loads (the file
keeps 8 bits, the arithmetic is fp32's).

The ONNX ``GRU`` and ``RNN`` operators take float matrices only, and onnxruntime has no quantized
form of them, so theirs stay in float (counted under ``left_in_float``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .rewrite import FALLBACK_SINCE, MS_DOMAIN, ONNXRUNTIME_SINCE, import_contrib_ops

FORM = "DynamicQuantizeLSTM.8bit"  # in rewrite.ONNXRUNTIME_SINCE
FLOAT_ONLY = ("GRU", "RNN")
LSTM_INPUTS = 8  # X, W, R, B, sequence_lens, initial_h, initial_c, P


def quantize_recurrent(model: onnx.ModelProto, counts: dict, allow, compute: str) -> str | None:
    """Rewrite ``model``'s LSTM nodes in place; ``counts`` (``quantize_graph``'s) gains the
    "recurrent" matrices quantized and left in float, and the forms written. Returns how the LSTMs
    multiply: "int8" (DynamicQuantizeLSTM), "float" (8-bit codes dequantized into the float LSTM
    when the session loads: ``compute="float"``, or a target without the operator), None without any."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    integer = compute == "int8" and allow(FORM)
    replaced: set[str] = set()
    dequantizing: list[onnx.NodeProto] = []
    done = None
    for i, node in enumerate(graph.node):
        if node.op_type in FLOAT_ONLY:
            counts["float"]["recurrent"] += 2
        if node.op_type != "LSTM":
            continue
        weights = [inits.get(name) for name in node.input[1:3]]
        layout = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "layout"), 0)
        if layout != 0 or any(w is None or len(w.dims) != 3 for w in weights):
            counts["float"]["recurrent"] += 2
            continue
        names = [w.name for w in weights]
        replaced.update(names)
        counts["quantized"]["recurrent"] += 2
        if integer:
            graph.node[i].CopyFrom(_dynamic_lstm(node, weights, graph))
            counts["forms"][FORM] = ONNXRUNTIME_SINCE[FORM]
            done = "int8"
            continue
        for w in weights:
            codes, scales = per_row_int8(numpy_helper.to_array(w))
            graph.initializer.extend([
                numpy_helper.from_array(np.ascontiguousarray(codes.transpose(0, 2, 1)), f"{w.name}.q8"),  # back to [directions, 4 * hidden, K]
                numpy_helper.from_array(scales[..., None], f"{w.name}.row_scales"),
            ])  # fmt: skip
            dequantizing.extend([
                helper.make_node("Cast", [f"{w.name}.q8"], [f"{w.name}.codes"], to=onnx.TensorProto.FLOAT),
                helper.make_node("Mul", [f"{w.name}.codes", f"{w.name}.row_scales"], [f"{w.name}.dequantized"]),
            ])  # fmt: skip
        node.input[1], node.input[2] = (f"{n}.dequantized" for n in names)
        if compute == "int8":
            counts["forms"][FORM + ".fallback"] = FALLBACK_SINCE
        done = "float"
    if dequantizing:
        nodes = dequantizing + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    if replaced:
        used = {name for node in graph.node for name in node.input}
        kept = [t for t in graph.initializer if t.name not in replaced or t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        import_contrib_ops(model)
    return done


def _dynamic_lstm(node: onnx.NodeProto, weights: list, graph) -> onnx.NodeProto:
    """``node`` as DynamicQuantizeLSTM, its W and R added to ``graph`` as 8-bit codes."""
    inputs = list(node.input) + [""] * (LSTM_INPUTS - len(node.input))
    for w in weights:
        codes, scales = per_row_int8(numpy_helper.to_array(w))
        graph.initializer.extend([
            numpy_helper.from_array(codes, f"{w.name}.q8"),
            numpy_helper.from_array(scales, f"{w.name}.scales"),
            numpy_helper.from_array(np.zeros(scales.shape, np.int8), f"{w.name}.zero_points"),
        ])  # fmt: skip
    w, r = (t.name for t in weights)
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "layout"}
    return helper.make_node(
        "DynamicQuantizeLSTM",
        [inputs[0], f"{w}.q8", f"{r}.q8", *inputs[3:], f"{w}.scales", f"{w}.zero_points", f"{r}.scales", f"{r}.zero_points"],
        list(node.output), name=node.name, domain=MS_DOMAIN, **attributes,
    )  # fmt: skip


def per_row_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An LSTM matrix [directions, 4 * hidden, K] as int8 codes [directions, K, 4 * hidden] (the
    layout DynamicQuantizeLSTM takes) and one scale per row, [directions, 4 * hidden]."""
    scales = np.abs(w).max(axis=2) / 127.0
    scales[scales == 0] = 1.0
    codes = np.clip(np.round(w / scales[..., None]), -127, 127).astype(np.int8)
    return np.ascontiguousarray(codes.transpose(0, 2, 1)), scales.astype(np.float32)
