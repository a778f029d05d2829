"""The Llama family (Llama, Mistral, Qwen2, SmolLM2, TinyLlama): RMSNorm, rotary positions, grouped
KV heads, SwiGLU MLP; optional q/k/v biases (Qwen2) and tied embeddings (SmolLM2)."""

from __future__ import annotations

import numpy as np

from ...runtime.manifest import Architecture
from . import ArchitectureSpec, register


def describe(config) -> Architecture:
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"activation {config.hidden_act!r} is not supported for the Llama family")
    heads = config.num_attention_heads
    context = config.max_position_embeddings
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window:
        context = min(context, window)  # the graph attends to the whole cache: stay inside the window
    return Architecture(
        family="llama",
        model_type=config.model_type,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_size=getattr(config, "head_dim", None) or config.hidden_size // heads,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        context_length=context,
    )


def rotary_tables(model, arch: Architecture) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [context, head_size / 2] from the model's own rotary module, so every rope scaling
    transformers implements (linear, dynamic, llama3, yarn) comes out as it computes it. transformers
    repeats the half-size table twice (rotate_half layout); the attention node takes one half."""
    import torch

    positions = torch.arange(arch.context_length, dtype=torch.int64)[None, :]
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(probe, positions)
    half = arch.head_size // 2
    return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()


def build(g, config, w, model) -> None:
    b, a = g.b, g.arch
    eps = float(config.rms_norm_eps)
    d, heads, kv_heads = a.head_size, a.num_heads, a.num_kv_heads

    def norm(x: str, residual: str | None, name: str) -> tuple[str, str]:
        """RMSNorm of x (+ residual): returns (normalized, the sum that carries on as the residual)."""
        gamma = b.weight(name, w(name))
        if residual is None:
            return b.op("SimplifiedLayerNormalization", x, gamma, axis=-1, epsilon=eps), x
        total = b.unique("residual")
        y = b.unique("normed")
        b.ms("SkipSimplifiedLayerNormalization", x, residual, gamma, out=[y, "", "", total], epsilon=eps)
        return y, total

    def proj(names: list[str], prefix: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Several [out, in] projections fused into one [in, sum(out)] matrix (and bias)."""
        weight = np.concatenate([w(f"{prefix}.{n}.weight") for n in names], axis=0).T
        if not any(f"{prefix}.{n}.bias" in w for n in names):
            return weight, None
        bias = [
            w(f"{prefix}.{n}.bias") if f"{prefix}.{n}.bias" in w else np.zeros(w.rows(f"{prefix}.{n}.weight"), np.float32)
            for n in names
        ]
        return weight, np.concatenate(bias)

    g.set_rotary(*rotary_tables(model, a))
    embed = b.weight("model.embed_tokens.weight", w("model.embed_tokens.weight"))  # [vocab, hidden]
    x = b.op("Gather", embed, g.input_ids)  # [B, S, hidden]
    residual = None
    for i in range(a.num_layers):
        p = f"model.layers.{i}"
        y, residual = norm(x, residual, p + ".input_layernorm.weight")
        qkv = b.linear(y, *proj(["q_proj", "k_proj", "v_proj"], p + ".self_attn"), p + ".self_attn.qkv_proj")
        attn = g.attention(i, qkv)  # qkv [B, S, (heads + 2 kv_heads) * d] -> [B, S, heads * d]
        x = b.linear(attn, *proj(["o_proj"], p + ".self_attn"), p + ".self_attn.o_proj")
        y, residual = norm(x, residual, p + ".post_attention_layernorm.weight")
        inter = config.intermediate_size
        gate_up = b.linear(y, *proj(["gate_proj", "up_proj"], p + ".mlp"), p + ".mlp.gate_up_proj")
        gate, up = b.op("Split", gate_up, b.const([inter, inter]), axis=-1, n_out=2)
        act = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), up)  # silu(gate) * up
        x = b.linear(act, *proj(["down_proj"], p + ".mlp"), p + ".mlp.down_proj")
    x, _ = norm(x, residual, "model.norm.weight")
    tied = getattr(config, "tie_word_embeddings", False)
    g.logits(x, embed if tied else w("lm_head.weight"))


register(
    ArchitectureSpec(
        family="llama",
        model_types=("llama", "mistral", "qwen2"),
        describe=describe,
        build=build,
    )
)
