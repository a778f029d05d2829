"""Qwen3 (dense): the Llama layout with a per-head RMSNorm of queries and keys before rotary."""

from __future__ import annotations

from .decoder import Layout
from .spec import decoder, standard_plan

LAYOUT = Layout(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")

decoder("qwen3", ("qwen3",), standard_plan, LAYOUT, gguf=("qwen3",))
