"""SmolLM3: the Llama layout; the layers that ``no_rope_layers`` marks 0 use no rotary positions."""

from __future__ import annotations

from .spec import decoder, standard_plan


def plan(config):
    return standard_plan(config, rotary=tuple("default" if use else None for use in config.no_rope_layers))


decoder("smollm3", ("smollm3",), plan)
