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
    """cos and sin [context, head_size] from the model's own rotary module, so every rope scaling
    transformers implements (linear, dynamic, llama3, yarn) comes out as it computes it."""
    import torch

    positions = torch.arange(arch.context_length, dtype=torch.int64)[None, :]
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(probe, positions)
    return cos[0].float().numpy(), sin[0].float().numpy()


def build(g, config, w, model) -> None:
    b, a = g.b, g.arch
    eps = float(config.rms_norm_eps)
    d, heads, kv_heads = a.head_size, a.num_heads, a.num_kv_heads

    def rms_norm(x: str, name: str) -> str:
        # x / sqrt(mean(x^2) + eps) * weight, written in the form onnxruntime fuses into one kernel
        var = b.op("ReduceMean", b.op("Pow", x, b.const(2.0, b.dtype)), axes=[-1], keepdims=1)
        y = b.op("Div", x, b.op("Sqrt", b.op("Add", var, b.const(eps, b.dtype))))
        return b.op("Mul", y, b.weight(name, w(name)))

    cos_table, sin_table = rotary_tables(model, a)
    cos = b.op("Unsqueeze", b.op("Gather", b.weight("rotary.cos", cos_table), g.position_ids), b.const([1]))  # [B, 1, S, d]
    sin = b.op("Unsqueeze", b.op("Gather", b.weight("rotary.sin", sin_table), g.position_ids), b.const([1]))

    def rotate(x: str) -> str:
        """x * cos + rotate_half(x) * sin, x [B, heads, S, d]"""
        x1, x2 = b.op("Split", x, b.const([d // 2, d // 2]), axis=-1, n_out=2)
        rotated = b.op("Concat", b.op("Neg", x2), x1, axis=-1)
        return b.op("Add", b.op("Mul", x, cos), b.op("Mul", rotated, sin))

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

    embed = b.weight("model.embed_tokens.weight", w("model.embed_tokens.weight"))  # [vocab, hidden]
    x = b.op("Gather", embed, g.input_ids)  # [B, S, hidden]
    for i in range(a.num_layers):
        p = f"model.layers.{i}"
        y = rms_norm(x, p + ".input_layernorm.weight")
        qkv = b.linear(y, *proj(["q_proj", "k_proj", "v_proj"], p + ".self_attn"), p + ".self_attn.qkv_proj")
        q, k, v = b.op("Split", qkv, b.const([heads * d, kv_heads * d, kv_heads * d]), axis=-1, n_out=3)
        q = rotate(g.split_heads(q, heads))
        k = rotate(g.split_heads(k, kv_heads))
        attn = g.attention(i, q, k, g.split_heads(v, kv_heads))
        o_w, o_b = proj(["o_proj"], p + ".self_attn")
        x = b.op("Add", x, b.linear(attn, o_w, o_b, p + ".self_attn.o_proj"))
        y = rms_norm(x, p + ".post_attention_layernorm.weight")
        inter = config.intermediate_size
        gate_up = b.linear(y, *proj(["gate_proj", "up_proj"], p + ".mlp"), p + ".mlp.gate_up_proj")
        gate, up = b.op("Split", gate_up, b.const([inter, inter]), axis=-1, n_out=2)
        act = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), up)  # silu(gate) * up
        down_w, down_b = proj(["down_proj"], p + ".mlp")
        x = b.op("Add", x, b.linear(act, down_w, down_b, p + ".mlp.down_proj"))
    x = rms_norm(x, "model.norm.weight")
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
