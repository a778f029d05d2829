"""What a family module declares itself with: ``decoder`` registers an ``ArchitectureSpec`` in
``REGISTRY`` from a ``Layout`` and a plan function; the helpers below read the config fields the
families share. ``Weights`` hands the source model's parameters to the graph builder."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from ...runtime.manifest import Architecture
from ..graph import DecoderGraph, RotaryTable
from .decoder import ACTIVATIONS, Layout, Plan, build_decoder


class Weights:
    """The source model's parameters by state-dict name, handed out as float32 numpy arrays."""

    def __init__(self, model):
        self._state = model.state_dict()

    def __call__(self, name: str) -> np.ndarray:
        return self._state[name].detach().float().cpu().numpy()

    def __contains__(self, name: str) -> bool:
        return name in self._state

    def shares(self, a: str, b: str) -> bool:
        """Whether two names are one tensor (tied embeddings)."""
        return self._state[a].data_ptr() == self._state[b].data_ptr()


@dataclass(frozen=True)
class ArchitectureSpec:
    family: str
    model_types: tuple[str, ...]
    describe: Callable[[Any], Architecture]  # transformers config -> Architecture
    build: Callable[[DecoderGraph, Any, Weights, Any], None]  # (graph, config, weights, torch model)
    gguf_architectures: tuple[str, ...] = ()  # GGUF ``general.architecture`` values transformers reads
    layout: Layout | None = None  # where the decoder builder found its weights (adapters map onto it)


REGISTRY: dict[str, ArchitectureSpec] = {}


def register(spec: ArchitectureSpec) -> ArchitectureSpec:
    for model_type in spec.model_types:
        REGISTRY[model_type] = spec
    return spec


def supported_model_types() -> list[str]:
    return sorted(REGISTRY)


def supported_gguf_architectures() -> list[str]:
    return sorted({a for spec in REGISTRY.values() for a in spec.gguf_architectures})


def spec_for(model_type: str) -> ArchitectureSpec:
    try:
        return REGISTRY[model_type]
    except KeyError:
        raise ValueError(
            f"architecture {model_type!r} is not supported yet; supported: {', '.join(supported_model_types())}"
        ) from None


def decoder(
    family: str,
    model_types: tuple[str, ...],
    plan: Callable[[Any], Plan],
    layout: Layout = Layout(),
    gguf: tuple[str, ...] = (),
) -> ArchitectureSpec:
    """Register a family built by the decoder builder: ``plan(config)`` reads the variations (and
    raises ValueError for a variant the graph cannot compute)."""

    def describe(config) -> Architecture:
        plan(config)
        heads = config.num_attention_heads
        return Architecture(
            family=family,
            model_type=config.model_type,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_size=getattr(config, "head_dim", None) or config.hidden_size // heads,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
            context_length=config.max_position_embeddings,
            rotary_switch_after=min(longrope_originals(config), default=0),
        )

    def build(g: DecoderGraph, config, weights: Weights, model) -> None:
        chosen = plan(config)
        keys = sorted({k for k in chosen.rotary if k is not None})
        build_decoder(g, layout, chosen, weights, {k: rotary_table(model, config, k, g.arch) for k in keys})

    return register(ArchitectureSpec(family, model_types, describe, build, gguf, layout))


# --- reading the common config fields -------------------------------------------------------------


def activation(name: str) -> str:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation {name!r} is not supported") from None


def sliding_windows(config) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: the whole context), from ``sliding_window`` and, where the
    config has them, its ``layer_types``."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False or window >= config.max_position_embeddings:
        return (None,) * n
    types = getattr(config, "layer_types", None) or ["sliding_attention"] * n
    return tuple(int(window) if t == "sliding_attention" else None for t in types)


def standard_plan(config, **changes) -> Plan:
    """RMSNorm, a gated MLP with the config's activation, rotary positions from one table in every
    layer, the config's sliding windows; ``changes`` replace any of these."""
    n = config.num_hidden_layers
    act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
    plan = Plan(norm_eps=float(config.rms_norm_eps), activation=activation(act), windows=sliding_windows(config),
                rotary=("default",) * n)  # fmt: skip
    return replace(plan, **changes)


def longrope_originals(config) -> list[int]:
    """The original contexts of the config's LongRoPE rotary parameters (one set, or one per layer type)."""
    params = getattr(config, "rope_parameters", None) or {}
    kinds = [p for p in params.values() if isinstance(p, dict)] or [params]
    return [int(p["original_max_position_embeddings"]) for p in kinds if p.get("rope_type") == "longrope"]


def rotary_table(model, config, key: str, arch: Architecture) -> RotaryTable:
    """Rotary table ``key`` ("default", or a layer type for configs with rope parameters per layer
    type), computed by the model's own rotary module so every rope scaling transformers implements
    comes out as it computes it; for LongRoPE the short and the long table. transformers repeats the
    half-size table twice (rotate_half layout); the attention node takes one half."""
    import torch

    module = model.model.rotary_emb
    params = config.rope_parameters if key == "default" else config.rope_parameters[key]
    extra = () if key == "default" else (key,)

    def tables(n: int) -> tuple[np.ndarray, np.ndarray]:
        positions = torch.arange(n, dtype=torch.int64)[None, :]
        with torch.no_grad():
            cos, sin = module(torch.zeros(1, dtype=torch.float32), positions, *extra)
        half = cos.shape[-1] // 2
        return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()

    if params.get("rope_type") != "longrope":
        return RotaryTable(tables(arch.context_length))
    original = int(params["original_max_position_embeddings"])
    long = tables(arch.context_length)
    short = tables(original)  # short factors up to the original context; past it the long table is in use
    short = tuple(np.concatenate([s, l[original:]]) for s, l in zip(short, long))
    return RotaryTable(short, long, original)

