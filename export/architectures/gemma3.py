"""Gemma 3, text only (Gemma3ForCausalLM: 270M, 1B): Gemma 2's layout without softcapping, plus
per-head q/k RMSNorm and a local:global pattern of layers, each kind with its own rotary table
(local base frequency; global base frequency and scaling)."""

from __future__ import annotations

from . import decoder, standard_plan
from .decoder import Layout
from .gemma2 import LAYOUT as GEMMA2

LAYOUT = Layout(**{**GEMMA2.__dict__, "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"})


def plan(config):
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("Gemma 3 with bidirectional attention is not a causal language model")
    return standard_plan(
        config,
        norm_offset=1.0,
        embed_scale=config.hidden_size**0.5,
        attention_scale=config.query_pre_attn_scalar**-0.5,
        attention_softcap=config.attn_logit_softcapping or 0.0,
        logits_softcap=config.final_logit_softcapping or 0.0,
        rotary=tuple(config.layer_types),
    )


decoder("gemma3", ("gemma3_text",), plan, LAYOUT, gguf=("gemma3",))
