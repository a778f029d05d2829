"""Gemma 2: embeddings scaled by sqrt(hidden), RMSNorm as (1 + w), norms before and after both
attention and MLP, attention scaled by query_pre_attn_scalar, attention-score and final-logit
softcapping, sliding-window and global layers alternating, GELU-tanh gated MLP, tied embeddings."""

from __future__ import annotations

from .decoder import Layout
from .spec import decoder, standard_plan

LAYOUT = Layout(
    attn_out_norm="post_attention_layernorm",
    mlp_norm="pre_feedforward_layernorm",
    mlp_out_norm="post_feedforward_layernorm",
)


def plan(config):
    return standard_plan(
        config,
        norm_offset=1.0,
        embed_scale=config.hidden_size**0.5,
        attention_scale=config.query_pre_attn_scalar**-0.5,
        attention_softcap=config.attn_logit_softcapping or 0.0,
        logits_softcap=config.final_logit_softcapping or 0.0,
    )


decoder("gemma2", ("gemma2",), plan, LAYOUT, gguf=("gemma2",))
