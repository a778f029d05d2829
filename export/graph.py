"""A small helper for writing ONNX graphs node by node, plus the pieces every decoder shares:
the graph's inputs and outputs, fused attention over an in-place cache, and the logits head."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..runtime.compat import IR_VERSION, OPSET, Profile, allows, requirement_record
from ..runtime.manifest import Architecture, GraphIO
from .errors import ExportError
from .scratch_row import ScratchRow

MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib operators
INT64_MAX = np.iinfo(np.int64).max
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

    def op(self, op_type: str, *inputs: str, out: str | list[str] | None = None, n_out: int = 1, domain: str = "", **attrs):
        """Append a node; returns its output name (or a list when ``n_out`` > 1). ``out`` names the
        outputs (a list may hold "" for optional outputs left out)."""
        hint = op_type.lower()
        if isinstance(out, list):
            outputs = out
        else:
            outputs = [out] if out else [self.unique(hint) for _ in range(n_out)]
        node = helper.make_node(op_type, list(inputs), outputs, name=self.unique("n_" + op_type), domain=domain, **attrs)
        self.nodes.append(node)
        return outputs[0] if len(outputs) == 1 else outputs

    def ms(self, op_type: str, *inputs: str, **kwargs):
        """A node from onnxruntime's contrib operators (domain com.microsoft)."""
        return self.op(op_type, *inputs, domain=MS_DOMAIN, **kwargs)

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
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name=producer)
        model.ir_version = IR_VERSION  # readable by onnxruntime 1.14 and newer (older Jetson builds)
        return model


# The oldest onnxruntime release whose CPU provider runs each feature of the decoder graphs, measured
# by running graphs that use it under each release from 1.17 on and comparing with the current one.
# A graph needs the newest release among the features it uses (``DecoderGraph.requires``).
ONNXRUNTIME_SINCE: dict[str, str] = {
    # CPU kernel, packed q/k/v, rotary inside, in-place cache: 1.17 rejects the graph; 1.18 loads it but
    # reads positions left in a reused cache buffer (a second prompt after a reset goes wrong)
    "GroupQueryAttention": "1.19",
    "GroupQueryAttention.separate_qkv": "1.19",
    "GroupQueryAttention.partial_rotary": "1.19",  # cos/sin narrower than head_size / 2
    "GroupQueryAttention.softcap": "1.20",  # 1.19 rejects the attribute
    "GroupQueryAttention.local_window_size": "1.24",  # before, a window of W saw W + 1 positions
    "GroupQueryAttention.scratch_row": "1.20",  # 1.19 mis-reads several new positions over a cache
    "If": "1.18",  # rotary tables switched by length (LongRoPE)
}


@dataclass(frozen=True)
class RotaryTable:
    """cos, sin [context, rotary_dim / 2] (half-rotation layout). With ``long``, LongRoPE's pair:
    ``long`` is used while the longest row of the batch holds more than ``longer_than`` positions,
    ``short`` otherwise, as transformers chooses its factors for each forward pass."""

    short: tuple[np.ndarray, np.ndarray]
    long: tuple[np.ndarray, np.ndarray] | None = None
    longer_than: int = 0


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


class DecoderGraph:
    """The inputs, outputs and shared subgraphs of a decoder whose KV cache is updated in place
    (names and shapes: ``GraphIO`` in the runtime's manifest module).

    Attention is onnxruntime's GroupQueryAttention: it reads each row's length from the attention
    mask, writes the new keys and values into the cache buffer at that row's own offset, applies
    rotary positions itself, and needs no mask tensor, so rows of different lengths share a batch.
    Each layer picks its own rotary table (or none), sliding window, score softcap and scale.

    With ``io.scratch_positions`` (1), a pass over a batch of one row gives every attention node a
    scratch query row (``scratch_row.ScratchRow``), so a pass checking k positions gives exactly the
    logits of k one-position steps.
    """

    def __init__(self, b: GraphBuilder, arch: Architecture, io: GraphIO):
        self.b, self.arch, self.io = b, arch, io
        self.features: set[str] = set()
        cache_shape = ["batch", arch.num_kv_heads, "capacity", arch.head_size]
        self.input_ids = b.input(io.input_ids, TensorProto.INT64, ["batch", "sequence"])
        self.attention_mask = b.input(io.attention_mask, TensorProto.INT64, ["batch", "total_sequence"])
        self._position_ids: str | None = None
        self.logits_to_keep = b.input(io.logits_to_keep, TensorProto.INT64, [])
        self.past = []
        for i in range(arch.num_layers):
            k = b.input(io.past_key.format(layer=i), b.elem, cache_shape)
            v = b.input(io.past_value.format(layer=i), b.elem, cache_shape)
            self.past.append((k, v))
        b.output(io.logits, b.elem, ["batch", "kept", arch.vocab_size])
        for i in range(arch.num_layers):
            b.output(io.present_key.format(layer=i), b.elem, cache_shape)
            b.output(io.present_value.format(layer=i), b.elem, cache_shape)
        # Shared by every layer's attention:
        lengths = b.op("ReduceSum", self.attention_mask, b.const([1]), keepdims=0)  # [batch]: cached + new
        self.total = b.op("Gather", b.op("Shape", self.attention_mask), b.const(1), axis=0)  # [] int64: longest row
        self.scratch = ScratchRow(b, self.input_ids) if io.scratch_positions else None
        total = self.total
        if self.scratch:
            lengths, total = self.scratch.lengths(lengths, total)
        self.seqlens_k = b.op("Cast", b.op("Sub", lengths, b.const(1)), to=TensorProto.INT32)  # [batch]
        self.total_length = b.op("Cast", total, to=TensorProto.INT32)  # [] int32
        self.rotary_tables: dict[str, tuple[str, str, int]] = {}  # key -> cos, sin, rotary_dim / 2

    @property
    def position_ids(self) -> str:
        """int64 [batch, seq], declared only for families that read it (learned position tables);
        rotary families get their positions from the cache lengths inside the attention node."""
        if self._position_ids is None:
            self._position_ids = self.b.input(self.io.position_ids, TensorProto.INT64, ["batch", "sequence"])
        return self._position_ids

    @property
    def uses_position_ids(self) -> bool:
        return self._position_ids is not None

    @property
    def requires(self) -> str:
        """The oldest onnxruntime release that runs this graph (see ``ONNXRUNTIME_SINCE``)."""
        return max((ONNXRUNTIME_SINCE[f] for f in self.features), key=_version_key, default="1.14")

    def requirement(self, profile: Profile) -> dict:
        """The manifest's ``requires`` record for ``profile``; ExportError when the graph uses a form
        the profile's onnxruntime lacks (attention features have no plainer fallback)."""
        forms = {f: ONNXRUNTIME_SINCE[f] for f in self.features}
        missing = sorted(f for f, since in forms.items() if not allows(profile, since))
        if missing:
            need = max((forms[f] for f in missing), key=_version_key)
            raise ExportError(
                f"this {self.arch.model_type} graph needs onnxruntime {need} ({', '.join(missing)}), newer than "
                f"target {profile.name} ({profile.onnxruntime}); choose --target ort-{need} or newer"
            )
        return requirement_record(forms, forms, profile)

    def add_rotary(self, key: str, table: "RotaryTable") -> None:
        """Register rotary table ``key``; a switched table is chosen by length at every step."""
        if self.scratch:
            table = self.scratch.grown(table)
        if table.long is None:
            cos, sin = (self.b.weight(f"rotary.{key}.{n}", t) for n, t in zip(("cos", "sin"), table.short))
        else:
            cos, sin = self._switched(key, table)
        self.rotary_tables[key] = (cos, sin, table.short[0].shape[1])

    def _switched(self, key: str, table: "RotaryTable") -> tuple[str, str]:
        """cos, sin: the long tables while the longest row holds more than ``table.longer_than``
        positions, else the short ones (an If node whose branches hold them as constants)."""
        b = self.b
        outputs = [b.unique(f"rotary.{key}.cos"), b.unique(f"rotary.{key}.sin")]

        def branch(name: str, tables: tuple[np.ndarray, np.ndarray]) -> onnx.GraphProto:
            nodes, values = [], []
            for out, array in zip(outputs, tables):
                tensor = numpy_helper.from_array(np.ascontiguousarray(array.astype(b.dtype)), f"{name}.{out}")
                nodes.append(helper.make_node("Constant", [], [f"{name}.{out}.value"], value=tensor))
                values.append(helper.make_tensor_value_info(f"{name}.{out}.value", b.elem, list(array.shape)))
            return helper.make_graph(nodes, name, [], values)

        longer = b.op("Greater", self.total, b.const(table.longer_than))
        b.op("If", longer, out=outputs, then_branch=branch("long", table.long), else_branch=branch("short", table.short))
        self.features.add("If")
        return outputs[0], outputs[1]

    def attention(
        self,
        layer: int,
        q: str,
        k: str | None = None,
        v: str | None = None,
        rotary: str | None = None,
        window: int | None = None,
        softcap: float = 0.0,
        scale: float | None = None,
    ) -> str:
        """Attention of layer ``layer`` -> [batch, seq, heads * head_size]. ``q`` is packed q/k/v
        [batch, seq, (heads + 2 kv_heads) * head_size] when ``k`` and ``v`` are None, else queries
        with separate keys and values. ``rotary`` names the table rotating queries and keys (None:
        no rotary); ``window``: each position sees only the last ``window`` positions (None: all);
        ``softcap``: scores become softcap * tanh(scores / softcap); ``scale``: of the scores,
        default 1 / sqrt(head_size). Writes the new keys and values into the layer's cache buffer
        (present shares past's memory)."""
        b, a, io = self.b, self.arch, self.io
        past_k, past_v = self.past[layer]
        if self.scratch:
            q, k, v = (x and self.scratch.added(x) for x in (q, k, v))
            self.features.add("GroupQueryAttention.scratch_row")
        inputs = [q, k or "", v or "", past_k, past_v, self.seqlens_k, self.total_length]
        attrs = {}
        self.features.add("GroupQueryAttention")
        if k is not None:
            self.features.add("GroupQueryAttention.separate_qkv")
        if rotary is not None:
            cos, sin, width = self.rotary_tables[rotary]
            inputs += [cos, sin]
            if width < a.head_size // 2:
                self.features.add("GroupQueryAttention.partial_rotary")
        if window is not None:
            self.features.add("GroupQueryAttention.local_window_size")
        if softcap:
            attrs["softcap"] = float(softcap)  # left out when unused: older releases reject the attribute
            self.features.add("GroupQueryAttention.softcap")
        out = b.unique("attention")
        rows = b.unique("attention.rows") if self.scratch else out
        b.ms(
            "GroupQueryAttention", *inputs,
            out=[rows, io.present_key.format(layer=layer), io.present_value.format(layer=layer)],
            num_heads=a.num_heads, kv_num_heads=a.num_kv_heads,
            scale=float(scale if scale is not None else 1.0 / np.sqrt(a.head_size)),
            do_rotary=int(rotary is not None), rotary_interleaved=0,
            local_window_size=-1 if window is None else int(window), **attrs,
        )  # fmt: skip
        if self.scratch:
            self.scratch.dropped(rows, out)
        return out

    def logits(self, hidden: str, lm_head: np.ndarray | str, divisor: float = 1.0, softcap: float = 0.0) -> None:
        """hidden [batch, seq, hidden] -> logits [batch, kept, vocab] for the last ``logits_to_keep``
        positions only, with lm_head [vocab, hidden] (an array, or the name of an initializer already
        stored, such as tied embeddings). Decoding keeps 1: the vocabulary projection of a long prompt
        is never computed. The logits are divided by ``divisor`` and then, with a ``softcap``, become
        softcap * tanh(logits / softcap)."""
        b = self.b
        w = lm_head if isinstance(lm_head, str) else b.weight("lm_head.weight", lm_head)
        start = b.op("Neg", b.op("Unsqueeze", self.logits_to_keep, b.const([0])))  # [1]
        last = b.op("Slice", hidden, start, b.const([INT64_MAX]), b.const([1]))  # [batch, kept, hidden]
        flat = b.op("Reshape", last, b.const([-1, self.arch.hidden_size]))
        logits = b.op("Gemm", flat, w, transB=1)  # [batch * kept, vocab]
        if divisor != 1.0:
            logits = b.op("Div", logits, b.const(divisor, b.dtype))
        if softcap:
            cap = b.const(softcap, b.dtype)
            logits = b.op("Mul", b.op("Tanh", b.op("Div", logits, cap)), cap)
        shape = b.op("Concat", b.op("Shape", last, start=0, end=2), b.const([self.arch.vocab_size]), axis=0)
        b.op("Reshape", logits, shape, out=self.io.logits)
