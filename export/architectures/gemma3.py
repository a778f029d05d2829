"""Gemma 3, text only (Gemma3ForCausalLM: 270M, 1B): Gemma 2's layout without softcapping, plus
per-head q/k RMSNorm and a local:global pattern of layers, each kind with its own rotary table
(local base frequency; global base frequency and scaling)."""

from __future__ import annotations

from dataclasses import replace

from .decoder import Layout
from .gemma2 import LAYOUT as GEMMA2, plan as gemma2_plan
from .spec import decoder

LAYOUT = Layout(**{**GEMMA2.__dict__, "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"})


def plan(config):
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("Gemma 3 with bidirectional attention is not a causal language model")
    return replace(gemma2_plan(config), rotary=tuple(config.layer_types))  # softcaps: None in Gemma 3 configs


decoder("gemma3", ("gemma3_text",), plan, LAYOUT, gguf=("gemma3",))
