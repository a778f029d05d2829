"""The encoder graph, written from the weights of any family in ``families``.

    input_ids, attention_mask [batch, seq] (and token_type_ids, when io names it)
    -> token embeddings + position embeddings + token type embeddings (when the graph takes no
       token_type_ids, type 0, folded into the position table)
    -> LayerNorm
    -> per layer: one q/k/v MatMul, MultiHeadAttention (q/k/v biases and the padding mask inside),
       output MatMul, bias + residual, LayerNorm, MLP MatMul, BiasGelu / FastGelu (bias and GELU
       in one node), MatMul, bias + residual, LayerNorm
    -> embed:    pooling over the unpadded tokens (mean, CLS, max or mean / sqrt(length)), then
                 L2 normalization when the model's pipeline normalizes
       classify: the first token's hidden state through the classification head -> logits

Each fused operator (com.microsoft) was kept or left out by measuring all-MiniLM-L6-v2 on the CPU
(docs/benchmarks.md): MultiHeadAttention and BiasGelu are used; SkipLayerNormalization was slower
than onnxruntime's own Add + LayerNormalization kernels and is not; EmbedLayerNormalization
would take int32 ids and a float table for a step that costs almost nothing, and is not. The
projections stay plain MatMuls so that quantization can rewrite them, and the embedding lookup a
plain Gather so that its table can be quantized.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto

from ...runtime.manifest import EncoderIO
from ..graph import GraphBuilder
from .families import EncoderFamily

POOLINGS = ("mean", "cls", "max", "mean_sqrt_len")
_GELU = {"gelu": "BiasGelu", "gelu_new": "FastGelu", "gelu_pytorch_tanh": "FastGelu", "gelu_fast": "FastGelu"}


def activation_kind(name: str) -> str:
    """Check that the MLP activation ``name`` (the config's) can be written; returns it."""
    if name not in _GELU and name != "relu":
        raise ValueError(f"encoder activation {name!r} is not supported; supported: {', '.join([*_GELU, 'relu'])}")
    return name


def build_encoder(
    family: EncoderFamily,
    config,
    weights: Callable[[str], np.ndarray],
    head_weights: Callable[[str], np.ndarray] | None,
    io: EncoderIO,
    context_length: int,
    pooling: str = "mean",
    normalize: bool = False,
    base_prefix: str = "",
    producer: str = "lmrt",
) -> onnx.ModelProto:
    """The graph of one encoder. ``weights`` reads the base model's parameters by state-dict name
    (as float32 arrays); ``head_weights``, the whole classification model's: with it the graph ends
    in the classification head (logits), without it in the pooled sentence embedding."""
    b = GraphBuilder(np.float32)
    hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
    eps = float(getattr(config, family.norm_eps_attribute)) if family.norm_eps_attribute else 1e-12
    activation = activation_kind(getattr(config, family.activation_attribute))
    input_ids = b.input(io.input_ids, TensorProto.INT64, ["batch", "sequence"])
    mask = b.input(io.attention_mask, TensorProto.INT64, ["batch", "sequence"])

    def bias(prefix: str) -> str:
        return b.weight(prefix + ".bias", weights(prefix + ".bias"))

    def norm(x: str, prefix: str) -> str:
        return b.op("LayerNormalization", x, b.weight(prefix + ".weight", weights(prefix + ".weight")), bias(prefix),
                    axis=-1, epsilon=eps)  # fmt: skip

    def add_norm(y: str, y_bias: str, residual: str, prefix: str) -> str:
        """LayerNorm(y + bias + residual)."""
        return norm(b.op("Add", b.op("Add", y, y_bias), residual), prefix)

    # Embeddings. Positions run 0 .. seq - 1 for every row (rows are padded on the right), so the
    # position table is sliced, not gathered.
    first = int(config.pad_token_id) + 1 if family.positions_after_padding else 0
    positions = weights(family.position_embeddings + ".weight")[first : first + context_length]
    if family.token_type_embeddings and not io.token_type_ids:
        positions = positions + weights(family.token_type_embeddings + ".weight")[0]
    words = b.op("Gather", b.weight(family.word_embeddings + ".weight", weights(family.word_embeddings + ".weight")), input_ids)
    seq = b.op("Shape", input_ids, start=1, end=2)  # [1]
    table = b.op("Slice", b.weight("position_table", positions), b.const([0]), seq, b.const([0]))  # [seq, hidden]
    x = b.op("Add", words, table)
    if io.token_type_ids:
        types = b.input(io.token_type_ids, TensorProto.INT64, ["batch", "sequence"])
        type_table = b.weight(family.token_type_embeddings + ".weight", weights(family.token_type_embeddings + ".weight"))
        x = b.op("Add", x, b.op("Gather", type_table, types))
    x = norm(x, family.embeddings_norm)

    key_padding_mask = b.op("Cast", mask, to=TensorProto.INT32)
    for i in range(int(config.num_hidden_layers)):
        p = family.layer.format(i=i) + "."
        names = [p + family.query, p + family.key, p + family.value]
        qkv_weight = np.concatenate([weights(n + ".weight").T for n in names], axis=1)  # [hidden, 3 hidden]
        qkv = b.op("MatMul", x, b.weight(p + "qkv.weight", qkv_weight))
        q, k, v = b.op("Split", qkv, b.const([hidden] * 3), axis=-1, n_out=3)
        qkv_bias = b.weight(p + "qkv.bias", np.concatenate([weights(n + ".bias") for n in names]))
        attention = b.ms(
            "MultiHeadAttention", q, k, v, qkv_bias, key_padding_mask,
            num_heads=heads, scale=float(1.0 / np.sqrt(hidden // heads)),
        )  # fmt: skip
        out = p + family.attention_output
        x = add_norm(b.op("MatMul", attention, _linear_weight(b, weights, out)), bias(out), x, p + family.attention_norm)
        y = b.op("MatMul", x, _linear_weight(b, weights, p + family.mlp_in))
        y = _activation(b, y, bias(p + family.mlp_in), activation)
        out = p + family.mlp_out
        x = add_norm(b.op("MatMul", y, _linear_weight(b, weights, out)), bias(out), x, p + family.mlp_norm)

    if head_weights is None:
        out = _pool(b, x, mask, pooling)
        if normalize:  # x / max(|x|, 1e-12), as torch.nn.functional.normalize
            length = b.op("Sqrt", b.op("ReduceSumSquare", out, axes=[-1], keepdims=1))
            out = b.op("Div", out, b.op("Max", length, b.const(1e-12, np.float32)))
        width = hidden
    else:
        out = _first_token(b, x)
        for layer in family.head:
            name = layer.weights.format(base=base_prefix)
            w = head_weights(name + ".weight")  # [out, in]; a Gemm, which int8 leaves in float
            out = b.op("Gemm", out, b.weight(name + ".weight", w), b.weight(name + ".bias", head_weights(name + ".bias")),
                       transB=1)  # fmt: skip
            if layer.activation:
                out = b.op({"tanh": "Tanh", "relu": "Relu"}[layer.activation], out)
        width = int(w.shape[0])
    b.op("Identity", out, out=io.output)
    b.output(io.output, TensorProto.FLOAT, ["batch", width])
    return b.build(f"lmrt_{family.family}_encoder", producer=producer)


def _linear_weight(b: GraphBuilder, weights, prefix: str) -> str:
    return b.weight(prefix + ".weight", weights(prefix + ".weight").T)  # torch [out, in] -> [in, out]


def _activation(b: GraphBuilder, y: str, bias: str, kind: str) -> str:
    """activation(y + bias); GELU with its bias in one node."""
    if kind == "relu":
        return b.op("Relu", b.op("Add", y, bias))
    return b.ms(_GELU[kind], y, bias)


def _first_token(b: GraphBuilder, x: str) -> str:
    """[batch, seq, hidden] -> [batch, hidden] at position 0 (the CLS / <s> token)."""
    return b.op("Squeeze", b.op("Gather", x, b.const([0]), axis=1), b.const([1]))


def _pool(b: GraphBuilder, x: str, mask: str, pooling: str) -> str:
    """[batch, seq, hidden] -> [batch, hidden] over the tokens whose mask is 1."""
    if pooling == "cls":
        return _first_token(b, x)
    weights = b.op("Unsqueeze", b.op("Cast", mask, to=TensorProto.FLOAT), b.const([-1]))  # [batch, seq, 1]
    if pooling == "max":
        kept = b.op("Where", b.op("Cast", weights, to=TensorProto.BOOL), x, b.const(-np.inf, np.float32))
        return b.op("ReduceMax", kept, axes=[1], keepdims=0)
    if pooling not in ("mean", "mean_sqrt_len"):
        raise ValueError(f"pooling {pooling!r} is not supported; supported: {', '.join(POOLINGS)}")
    total = b.op("ReduceSum", b.op("Mul", x, weights), b.const([1]), keepdims=0)  # [batch, hidden]
    count = b.op("Max", b.op("ReduceSum", weights, b.const([1]), keepdims=0), b.const(1e-9, np.float32))  # [batch, 1]
    return b.op("Div", total, count if pooling == "mean" else b.op("Sqrt", count))
