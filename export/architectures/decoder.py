"""The one decoder builder every family uses: embeddings, N blocks of attention and MLP with their
norms and residual adds, the final norm and the logits head.

A family says where its weights are (``Layout``) and which variations its config asks for
(``Plan``); this module turns both into the graph. Nothing here branches on the model type.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ACTIVATIONS = {  # transformers' names -> how the graph computes them
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
}


@dataclass(frozen=True)
class Layout:
    """Where a family keeps its weights: state-dict names, ``{i}`` standing for the layer index.
    Projections listed together are fused into one matrix; a bias is used where the model has one."""

    embed: str = "model.embed_tokens.weight"
    positions: str | None = None  # a learned position table
    layer: str = "model.layers.{i}."
    attn_norm: str = "input_layernorm"
    attn_out_norm: str | None = None  # a norm of the attention output, before the residual add
    mlp_norm: str = "post_attention_layernorm"
    mlp_out_norm: str | None = None  # a norm of the MLP output, before the residual add
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    q_norm: str | None = None  # per-head norms of queries and keys, before rotary
    k_norm: str | None = None
    out: str = "self_attn.o_proj"
    up: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")  # gate first when the MLP is gated
    down: str = "mlp.down_proj"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head.weight"
    in_out: bool = False  # linear weights stored [in, out] (GPT-2's Conv1D) rather than [out, in]


@dataclass(frozen=True)
class Plan:
    """The variations of one model, read from its config by the family's ``plan`` function."""

    norm_eps: float
    norm: str = "rms"  # "rms" or "layer" (LayerNorm with a bias)
    norm_offset: float = 0.0  # norms multiply by (offset + weight): Gemma's (1 + w)
    activation: str = "silu"  # a key of ACTIVATIONS
    gated: bool = True  # act(gate) * up, else act(up)
    embed_scale: float = 1.0
    residual_scale: float = 1.0  # each block's output is scaled before its residual add
    attention_scale: float | None = None  # None: 1 / sqrt(head_size)
    attention_softcap: float = 0.0
    logits_divisor: float = 1.0
    logits_softcap: float = 0.0
    windows: tuple[int | None, ...] = ()  # per layer: sliding window, None = the whole context
    rotary: tuple[str | None, ...] = ()  # per layer: rotary table ("default" or a layer type), None = none

    def __post_init__(self):
        if self.activation not in ACTIVATIONS.values():
            raise ValueError(f"activation {self.activation!r} is not supported")
        if len(self.windows) != len(self.rotary):
            raise ValueError("windows and rotary need one entry per layer")


def projections(layout: Layout, layer: int) -> dict[str, tuple[str, tuple[str, ...]]]:
    """The linear projections of layer ``layer``: lmrt's name ("qkv", "out", "up", "down") -> (the
    graph's name of its matrix, the source modules fused into it, in column order)."""
    p = layout.layer.format(i=layer)
    return {
        "qkv": (p + "attn.qkv", tuple(p + n for n in layout.qkv)),
        "out": (p + layout.out, (p + layout.out,)),
        "up": (p + "mlp.up", tuple(p + n for n in layout.up)),
        "down": (p + layout.down, (p + layout.down,)),
    }


def build_decoder(g, layout: Layout, plan: Plan, w, rotary_tables: dict) -> None:
    """Write the decoder into ``g`` (a DecoderGraph). ``w``: the source's Weights; ``rotary_tables``:
    {key: RotaryTable} for the keys ``plan.rotary`` names."""
    b, a, L = g.b, g.arch, layout
    attention_size = a.num_heads * a.head_size
    kv_size = a.num_kv_heads * a.head_size

    def matrix(names: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """Projections fused into one [in, sum(out)] matrix, and their bias (zeros where missing)."""
        mats = [w(f"{n}.weight") for n in names]
        weight = np.concatenate(mats, axis=1) if L.in_out else np.concatenate(mats, axis=0).T
        if not any(f"{n}.bias" in w for n in names):
            return weight, None
        width = [m.shape[1] if L.in_out else m.shape[0] for m in mats]
        bias = [w(f"{n}.bias") if f"{n}.bias" in w else np.zeros(k, np.float32) for n, k in zip(names, width)]
        return weight, np.concatenate(bias)

    def linear(x: str, names: list[str], name: str) -> str:
        return b.linear(x, *matrix(names), name)

    def gamma(name: str) -> str:
        return b.weight(f"{name}.weight", w(f"{name}.weight") + np.float32(plan.norm_offset))

    def norm(x: str, residual: str | None, name: str) -> tuple[str, str]:
        """Norm of x (+ residual): (normalized, the sum that carries on as the residual)."""
        inputs = [gamma(name)] + ([b.weight(f"{name}.bias", w(f"{name}.bias"))] if plan.norm == "layer" else [])
        if residual is None:
            op = "LayerNormalization" if plan.norm == "layer" else "SimplifiedLayerNormalization"
            return b.op(op, x, *inputs, axis=-1, epsilon=plan.norm_eps), x
        total, y = b.unique("residual"), b.unique("normed")
        op = "SkipLayerNormalization" if plan.norm == "layer" else "SkipSimplifiedLayerNormalization"
        b.ms(op, x, residual, *inputs, out=[y, "", "", total], epsilon=plan.norm_eps)
        return y, total

    def head_norm(x: str, name: str) -> str:
        """RMSNorm of each head of x [batch, seq, heads * head_size]."""
        heads = b.op("Reshape", x, b.const([0, 0, -1, a.head_size]))
        y = b.op("SimplifiedLayerNormalization", heads, gamma(name), axis=-1, epsilon=plan.norm_eps)
        return b.op("Reshape", y, b.const([0, 0, -1]))

    def scaled(x: str, factor: float) -> str:
        return x if factor == 1.0 else b.op("Mul", x, b.const(factor, b.dtype))

    def block_output(x: str, out_norm: str | None) -> str:
        """A block's output as it joins the residual: normed (post-norm families) and scaled."""
        if out_norm is not None:
            x, _ = norm(x, None, out_norm)
        return scaled(x, plan.residual_scale)

    for key, table in rotary_tables.items():
        g.add_rotary(key, table)
    embed = b.weight(L.embed, w(L.embed))  # [vocab, hidden]
    x = scaled(b.op("Gather", embed, g.input_ids), plan.embed_scale)  # [B, S, hidden]
    if L.positions:
        x = b.op("Add", x, b.op("Gather", b.weight(L.positions, w(L.positions)), g.position_ids))
    residual = None
    for i in range(a.num_layers):
        p, proj = L.layer.format(i=i), projections(L, i)
        y, residual = norm(x, residual, p + L.attn_norm)
        qkv = linear(y, list(proj["qkv"][1]), proj["qkv"][0])  # [B, S, attention + 2 kv]
        kv = {}
        if L.q_norm:
            q, k, v = b.op("Split", qkv, b.const([attention_size, kv_size, kv_size]), axis=-1, n_out=3)
            qkv, kv = head_norm(q, p + L.q_norm), {"k": head_norm(k, p + L.k_norm), "v": v}
        attn = g.attention(
            i, qkv, **kv, rotary=plan.rotary[i], window=plan.windows[i],
            softcap=plan.attention_softcap, scale=plan.attention_scale,
        )  # fmt: skip
        x = block_output(linear(attn, list(proj["out"][1]), proj["out"][0]), L.attn_out_norm and p + L.attn_out_norm)
        y, residual = norm(x, residual, p + L.mlp_norm)
        up_weight, up_bias = matrix(list(proj["up"][1]))
        h = b.linear(y, up_weight, up_bias, proj["up"][0])
        if plan.gated:  # the matrix holds the gate, then the up projection
            half = up_weight.shape[1] // 2
            gate, up = b.op("Split", h, b.const([half, half]), axis=-1, n_out=2)
            h = b.op("Mul", activation(b, gate, plan.activation), up)
        else:
            h = activation(b, h, plan.activation)
        x = block_output(linear(h, list(proj["down"][1]), proj["down"][0]), L.mlp_out_norm and p + L.mlp_out_norm)
    x, _ = norm(x, residual, L.final_norm)
    tied = L.lm_head not in w or w.shares(L.lm_head, L.embed)
    g.logits(x, embed if tied else w(L.lm_head), plan.logits_divisor, plan.logits_softcap)


def activation(b, x: str, kind: str) -> str:
    if kind == "silu":
        return b.op("Mul", x, b.op("Sigmoid", x))
    if kind == "gelu_tanh":
        # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = b.op("Mul", b.op("Mul", x, x), x)
        inner = b.op("Add", x, b.op("Mul", cube, b.const(0.044715, b.dtype)))
        t = b.op("Tanh", b.op("Mul", inner, b.const(np.sqrt(2.0 / np.pi), b.dtype)))
        return b.op("Mul", b.op("Mul", x, b.const(0.5, b.dtype)), b.op("Add", t, b.const(1.0, b.dtype)))
    # exact GELU: 0.5 x (1 + erf(x / sqrt(2)))
    e = b.op("Erf", b.op("Mul", x, b.const(1.0 / np.sqrt(2.0), b.dtype)))
    return b.op("Mul", b.op("Mul", x, b.const(0.5, b.dtype)), b.op("Add", e, b.const(1.0, b.dtype)))
