"""GPT-2: learned positions, LayerNorm with biases, fused QKV projection (Conv1D weights are stored
[in, out]), a plain GELU MLP, lm_head tied to the token embeddings."""

from __future__ import annotations

from .decoder import Layout, Plan
from .spec import activation, decoder

LAYOUT = Layout(
    embed="transformer.wte.weight",
    positions="transformer.wpe.weight",
    layer="transformer.h.{i}.",
    attn_norm="ln_1",
    mlp_norm="ln_2",
    qkv=("attn.c_attn",),
    out="attn.c_proj",
    up=("mlp.c_fc",),
    down="mlp.c_proj",
    final_norm="transformer.ln_f",
    in_out=True,
)


def plan(config) -> Plan:
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(config, "reorder_and_upcast_attn", False):
        raise ValueError("GPT-2 variants with scale_attn_by_inverse_layer_idx or reorder_and_upcast_attn are not supported")
    if not getattr(config, "scale_attn_weights", True):
        raise ValueError("GPT-2 without scale_attn_weights is not supported")
    n = config.n_layer
    return Plan(norm="layer", norm_eps=float(config.layer_norm_epsilon), activation=activation(config.activation_function),
                gated=False, windows=(None,) * n, rotary=(None,) * n)  # fmt: skip


decoder("gpt2", ("gpt2",), plan, LAYOUT, gguf=("gpt2",))
