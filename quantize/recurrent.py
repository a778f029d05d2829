"""A recurrent step graph's LSTM layers quantized: each ``LSTM`` node becomes onnxruntime's
``DynamicQuantizeLSTM``, whose input matrix W and recurrent matrix R are 8-bit, symmetric, one
scale per output row (the gate unit), and whose activations are quantized to 8 bits as it runs.

The ONNX ``GRU`` and ``RNN`` operators take float matrices only, and onnxruntime has no quantized
form of them, so theirs stay in float (counted under ``left_in_float``). An LSTM is left in float
too with float compute (``compute="float"``: the quantized LSTM always multiplies in 8 bits), or
where the target's onnxruntime lacks the operator.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .rewrite import MS_DOMAIN, ONNXRUNTIME_SINCE, import_contrib_ops

FORM = "DynamicQuantizeLSTM.8bit"  # in rewrite.ONNXRUNTIME_SINCE
FLOAT_ONLY = ("GRU", "RNN")
LSTM_INPUTS = 8  # X, W, R, B, sequence_lens, initial_h, initial_c, P


def quantize_recurrent(model: onnx.ModelProto, counts: dict, allow, compute: str) -> None:
    """Rewrite ``model``'s LSTM nodes in place; ``counts`` (``quantize_graph``'s) gains the
    "recurrent" matrices quantized and left in float, and the form written."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    replaced: set[str] = set()
    for i, node in enumerate(graph.node):
        if node.op_type in FLOAT_ONLY:
            counts["float"]["recurrent"] += 2
        if node.op_type != "LSTM":
            continue
        weights = [inits.get(name) for name in node.input[1:3]]
        layout = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "layout"), 0)
        if compute == "float" or layout != 0 or any(w is None or len(w.dims) != 3 for w in weights) or not allow(FORM):
            counts["float"]["recurrent"] += 2
            continue
        inputs = list(node.input) + [""] * (LSTM_INPUTS - len(node.input))
        quantized = []
        for w in weights:
            codes, scales = per_row_int8(numpy_helper.to_array(w))
            graph.initializer.extend([
                numpy_helper.from_array(codes, f"{w.name}.q8"),
                numpy_helper.from_array(scales, f"{w.name}.scales"),
                numpy_helper.from_array(np.zeros(scales.shape, np.int8), f"{w.name}.zero_points"),
            ])  # fmt: skip
            quantized.append(w.name)
            replaced.add(w.name)
        (w, r) = quantized
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "layout"}
        graph.node[i].CopyFrom(helper.make_node(
            "DynamicQuantizeLSTM",
            [inputs[0], f"{w}.q8", f"{r}.q8", *inputs[3:], f"{w}.scales", f"{w}.zero_points", f"{r}.scales", f"{r}.zero_points"],
            list(node.output), name=node.name, domain=MS_DOMAIN, **attributes,
        ))  # fmt: skip
        counts["quantized"]["recurrent"] += 2
        counts["forms"][FORM] = ONNXRUNTIME_SINCE[FORM]
    if replaced:
        used = {name for node in graph.node for name in node.input}
        kept = [t for t in graph.initializer if t.name not in replaced or t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        import_contrib_ops(model)


def per_row_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An LSTM matrix [directions, 4 * hidden, K] as int8 codes [directions, K, 4 * hidden] (the
    layout DynamicQuantizeLSTM takes) and one scale per row, [directions, 4 * hidden]."""
    scales = np.abs(w).max(axis=2) / 127.0
    scales[scales == 0] = 1.0
    codes = np.clip(np.round(w / scales[..., None]), -127, 127).astype(np.int8)
    return np.ascontiguousarray(codes.transpose(0, 2, 1)), scales.astype(np.float32)
