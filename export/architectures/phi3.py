"""Phi-3, Phi-3.5 and Phi-4-mini (Phi3ForCausalLM): fused qkv and gate_up projections, partial
rotary (``partial_rotary_factor``), LongRoPE with short and long factors chosen by length."""

from __future__ import annotations

from .decoder import Layout
from .spec import decoder, standard_plan

LAYOUT = Layout(qkv=("self_attn.qkv_proj",), up=("mlp.gate_up_proj",))



def plan(config):
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    factor = config.rope_parameters.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    rotary = int(head * factor)
    if rotary < head and rotary % 16:
        raise ValueError(f"partial rotary over {rotary} of {head} dimensions is not supported (a multiple of 16 is)")
    return standard_plan(config)


decoder("phi3", ("phi3",), plan, LAYOUT, gguf=("phi3",))
