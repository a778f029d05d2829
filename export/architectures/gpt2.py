"""GPT-2: learned positions, LayerNorm, fused QKV projection (Conv1D weights are already [in, out]),
GELU MLP, lm_head tied to the token embeddings."""

from __future__ import annotations

import numpy as np

from ...runtime.manifest import Architecture
from . import ArchitectureSpec, register


def describe(config) -> Architecture:
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(config, "reorder_and_upcast_attn", False):
        raise ValueError("GPT-2 variants with scale_attn_by_inverse_layer_idx or reorder_and_upcast_attn are not supported")
    if not getattr(config, "scale_attn_weights", True):
        raise ValueError("GPT-2 without scale_attn_weights is not supported")
    return Architecture(
        family="gpt2",
        model_type=config.model_type,
        num_layers=config.n_layer,
        num_heads=config.n_head,
        num_kv_heads=config.n_head,
        head_size=config.n_embd // config.n_head,
        hidden_size=config.n_embd,
        vocab_size=config.vocab_size,
        context_length=config.n_positions,
    )


def _gelu(b, x: str, kind: str) -> str:
    if kind in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = b.op("Mul", b.op("Mul", x, x), x)
        inner = b.op("Add", x, b.op("Mul", cube, b.const(0.044715, b.dtype)))
        t = b.op("Tanh", b.op("Mul", inner, b.const(np.sqrt(2.0 / np.pi), b.dtype)))
        return b.op("Mul", b.op("Mul", x, b.const(0.5, b.dtype)), b.op("Add", t, b.const(1.0, b.dtype)))
    if kind == "gelu":
        # 0.5 x (1 + erf(x / sqrt(2)))
        e = b.op("Erf", b.op("Mul", x, b.const(1.0 / np.sqrt(2.0), b.dtype)))
        return b.op("Mul", b.op("Mul", x, b.const(0.5, b.dtype)), b.op("Add", e, b.const(1.0, b.dtype)))
    raise ValueError(f"GPT-2 activation {kind!r} is not supported")


def build(g, config, w, model) -> None:
    b, a = g.b, g.arch
    eps = float(config.layer_norm_epsilon)

    def norm(x: str, residual: str | None, prefix: str) -> tuple[str, str]:
        """LayerNorm of x (+ residual): returns (normalized, the sum that carries on as the residual)."""
        scale, bias = b.weight(prefix + ".weight", w(prefix + ".weight")), b.weight(prefix + ".bias", w(prefix + ".bias"))
        if residual is None:
            return b.op("LayerNormalization", x, scale, bias, axis=-1, epsilon=eps), x
        total, y = b.unique("residual"), b.unique("normed")
        b.ms("SkipLayerNormalization", x, residual, scale, bias, out=[y, "", "", total], epsilon=eps)
        return y, total

    wte = b.weight("transformer.wte.weight", w("transformer.wte.weight"))  # [vocab, hidden]
    wpe = b.weight("transformer.wpe.weight", w("transformer.wpe.weight"))  # [positions, hidden]
    x = b.op("Add", b.op("Gather", wte, g.input_ids), b.op("Gather", wpe, g.position_ids))  # [B, S, hidden]
    residual = None
    for i in range(a.num_layers):
        p = f"transformer.h.{i}"
        y, residual = norm(x, residual, p + ".ln_1")
        qkv = b.linear(y, w(p + ".attn.c_attn.weight"), w(p + ".attn.c_attn.bias"), p + ".attn.c_attn")  # [B, S, 3 hidden]
        attn = g.attention(i, qkv)
        x = b.linear(attn, w(p + ".attn.c_proj.weight"), w(p + ".attn.c_proj.bias"), p + ".attn.c_proj")
        y, residual = norm(x, residual, p + ".ln_2")
        y = b.linear(y, w(p + ".mlp.c_fc.weight"), w(p + ".mlp.c_fc.bias"), p + ".mlp.c_fc")
        y = _gelu(b, y, config.activation_function)
        x = b.linear(y, w(p + ".mlp.c_proj.weight"), w(p + ".mlp.c_proj.bias"), p + ".mlp.c_proj")
    x, _ = norm(x, residual, "transformer.ln_f")
    tied = getattr(config, "tie_word_embeddings", True)
    g.logits(x, wte if tied else w("lm_head.weight"))


register(ArchitectureSpec(family="gpt2", model_types=("gpt2",), describe=describe, build=build))
