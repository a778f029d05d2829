"""The Llama family (Llama, Mistral, Qwen2, SmolLM2, TinyLlama): RMSNorm, rotary positions, grouped
KV heads, SwiGLU MLP; optional q/k/v biases (Qwen2), tied embeddings (SmolLM2) and sliding windows
(Mistral, Qwen2), layer by layer."""

from __future__ import annotations

from .spec import decoder, standard_plan


def plan(config):
    if config.hidden_act not in ("silu", "swish"):
        raise ValueError(f"activation {config.hidden_act!r} is not supported for the Llama family")
    return standard_plan(config)


decoder("llama", ("llama", "mistral", "qwen2"), plan, gguf=("llama", "mistral", "qwen2"))
