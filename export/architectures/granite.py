"""Granite (dense): the Llama layout with an embedding multiplier, an attention multiplier in place
of 1 / sqrt(head_size), a residual multiplier on each block's output and logits divided by
``logits_scaling``."""

from __future__ import annotations

from .spec import decoder, standard_plan


def plan(config):
    return standard_plan(
        config,
        embed_scale=config.embedding_multiplier,
        attention_scale=config.attention_multiplier,
        residual_scale=config.residual_multiplier,
        logits_divisor=config.logits_scaling,
    )


decoder("granite", ("granite",), plan)
