"""A small helper for writing ONNX graphs node by node, plus the pieces every decoder shares:
the graph's inputs and outputs, the attention mask, attention itself and the logits head."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..runtime.manifest import Architecture, GraphIO

OPSET = 17
_ELEM = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


class GraphBuilder:
    """Collects nodes and initializers; every helper returns the name of its output tensor."""

    def __init__(self, dtype=np.float32):
        self.dtype = np.dtype(dtype)
        self.elem = _ELEM[self.dtype]
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._counts: Counter[str] = Counter()
        self._consts: dict[tuple, str] = {}

    def unique(self, hint: str) -> str:
        self._counts[hint] += 1
        n = self._counts[hint]
        return hint if n == 1 else f"{hint}_{n}"

    def weight(self, name: str, array: np.ndarray) -> str:
        """A named initializer; floating arrays are stored in the graph's dtype."""
        array = np.asarray(array)
        if array.dtype.kind == "f":
            array = array.astype(self.dtype)
        name = self.unique(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small constant, shared between the nodes that use the same value."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight("const", array)
        return self._consts[key]

    def op(self, op_type: str, *inputs: str, out: str | None = None, n_out: int = 1, **attrs):
        """Append a node; returns its output name (or a list when ``n_out`` > 1)."""
        hint = out or op_type.lower()
        outputs = [out] if out else [self.unique(hint) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=self.unique("n_" + op_type), **attrs))
        return outputs[0] if n_out == 1 else outputs

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape: list) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def linear(self, x: str, weight: np.ndarray, bias: np.ndarray | None, name: str) -> str:
        """x @ weight (+ bias), weight stored as [in, out]."""
        y = self.op("MatMul", x, self.weight(name + ".weight", weight))
        return self.op("Add", y, self.weight(name + ".bias", bias)) if bias is not None else y

    def build(self, graph_name: str, producer: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name=producer)
        model.ir_version = 8  # readable by onnxruntime 1.14 and newer (older Jetson builds)
        return model


class DecoderGraph:
    """The inputs, outputs and shared subgraphs of a decoder with an explicit KV cache
    (names and shapes: ``GraphIO`` in the runtime's manifest module)."""

    def __init__(self, b: GraphBuilder, arch: Architecture, io: GraphIO):
        self.b, self.arch, self.io = b, arch, io
        kv_shape = ["batch", arch.num_kv_heads, "past_sequence", arch.head_size]
        present_shape = ["batch", arch.num_kv_heads, "total_sequence", arch.head_size]
        self.input_ids = b.input(io.input_ids, TensorProto.INT64, ["batch", "sequence"])
        self.attention_mask = b.input(io.attention_mask, TensorProto.INT64, ["batch", "total_sequence"])
        self.position_ids = b.input(io.position_ids, TensorProto.INT64, ["batch", "sequence"])
        self.past = []
        for i in range(arch.num_layers):
            k = b.input(io.past_key.format(layer=i), b.elem, kv_shape)
            v = b.input(io.past_value.format(layer=i), b.elem, kv_shape)
            self.past.append((k, v))
        b.output(io.logits, b.elem, ["batch", "sequence", arch.vocab_size])
        for i in range(arch.num_layers):
            b.output(io.present_key.format(layer=i), b.elem, present_shape)
            b.output(io.present_value.format(layer=i), b.elem, present_shape)
        self.allowed = self._attention_allowed()

    def _attention_allowed(self) -> str:
        """bool [batch, 1, 1, seq, total]: query i (at cache index past + i) may see key j when
        j <= past + i and attention_mask[j] is 1. Built once, shared by all layers."""
        b = self.b
        total = b.op("Shape", self.attention_mask, start=1, end=2)  # [1]
        seq = b.op("Shape", self.input_ids, start=1, end=2)  # [1]
        past = b.op("Sub", total, seq)
        scalar = b.const([0])
        q_pos = b.op("Range", b.op("Squeeze", past, scalar), b.op("Squeeze", total, scalar), b.const(1))  # [seq]
        k_pos = b.op("Range", b.const(0), b.op("Squeeze", total, scalar), b.const(1))  # [total]
        causal = b.op(
            "LessOrEqual", b.op("Unsqueeze", k_pos, b.const([0])), b.op("Unsqueeze", q_pos, b.const([1]))
        )  # [seq, total]
        padding = b.op("Unsqueeze", b.op("Cast", self.attention_mask, to=TensorProto.BOOL), b.const([1, 2, 3]))
        return b.op("And", causal, padding, out="attention_allowed")  # [batch, 1, 1, seq, total]

    def split_heads(self, x: str, heads: int) -> str:
        """[batch, seq, heads * head_size] -> [batch, heads, seq, head_size]"""
        b = self.b
        x = b.op("Reshape", x, b.const([0, 0, heads, self.arch.head_size]))
        return b.op("Transpose", x, perm=[0, 2, 1, 3])

    def attention(self, layer: int, q: str, k: str, v: str) -> str:
        """Scaled dot-product attention over the cache plus the new positions.

        q [batch, heads, seq, head_size]; k, v [batch, kv_heads, seq, head_size] (new positions only).
        Writes present k/v [batch, kv_heads, total, head_size]; returns [batch, seq, heads * head_size].
        Grouped KV heads are broadcast, not copied: q is viewed as [batch, kv_heads, group, seq, d].
        """
        b, a, io = self.b, self.arch, self.io
        heads, kv_heads, d = a.num_heads, a.num_kv_heads, a.head_size
        past_k, past_v = self.past[layer]
        k = b.op("Concat", past_k, k, axis=2, out=io.present_key.format(layer=layer))
        v = b.op("Concat", past_v, v, axis=2, out=io.present_value.format(layer=layer))
        q = b.op("Mul", q, b.const(1.0 / np.sqrt(d), b.dtype))
        q = b.op("Reshape", q, b.const([0, kv_heads, heads // kv_heads, -1, d]))  # [B, kv, g, seq, d]
        k = b.op("Unsqueeze", k, b.const([2]))  # [B, kv, 1, total, d]
        v = b.op("Unsqueeze", v, b.const([2]))
        scores = b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 2, 4, 3]))  # [B, kv, g, seq, total]
        scores = b.op("Where", self.allowed, scores, b.const(np.finfo(b.dtype).min, b.dtype))
        probs = b.op("Softmax", scores, axis=-1)
        out = b.op("MatMul", probs, v)  # [B, kv, g, seq, d]
        out = b.op("Reshape", out, b.const([0, heads, -1, d]))  # [B, heads, seq, d]
        out = b.op("Transpose", out, perm=[0, 2, 1, 3])  # [B, seq, heads, d]
        return b.op("Reshape", out, b.const([0, 0, heads * d]))

    def logits(self, hidden: str, lm_head: np.ndarray | str) -> None:
        """hidden [batch, seq, hidden] -> logits [batch, seq, vocab] with lm_head [vocab, hidden]
        (an array, or the name of an initializer already stored, such as tied embeddings)."""
        b = self.b
        w = lm_head if isinstance(lm_head, str) else b.weight("lm_head.weight", lm_head)
        flat = b.op("Reshape", hidden, b.const([-1, self.arch.hidden_size]))
        logits = b.op("Gemm", flat, w, transB=1)  # [batch * seq, vocab]
        shape = b.op("Concat", b.op("Shape", self.input_ids), b.const([self.arch.vocab_size]), axis=0)
        b.op("Reshape", logits, shape, out=self.io.logits)
