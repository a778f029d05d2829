"""Architectures lmrt can export, keyed by the source's ``model_type``.

Each module registers an ``ArchitectureSpec``: how to read the architecture facts from the source's
config, and how to write its ONNX graph from the weights. Adding a family is adding a module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ...runtime.manifest import Architecture
from ..graph import DecoderGraph



class Weights:
    """The source model's parameters by state-dict name, handed out as float32 numpy arrays."""

    def __init__(self, model):
        self._state = model.state_dict()

    def __call__(self, name: str) -> np.ndarray:
        return self._state[name].detach().float().cpu().numpy()

    def __contains__(self, name: str) -> bool:
        return name in self._state

    def rows(self, name: str) -> int:
        return int(self._state[name].shape[0])


@dataclass(frozen=True)
class ArchitectureSpec:
    family: str
    model_types: tuple[str, ...]
    describe: Callable[[Any], Architecture]  # transformers config -> Architecture
    build: Callable[[DecoderGraph, Any, Weights, Any], None]  # (graph, config, weights, torch model)


REGISTRY: dict[str, ArchitectureSpec] = {}


def register(spec: ArchitectureSpec) -> ArchitectureSpec:
    for model_type in spec.model_types:
        REGISTRY[model_type] = spec
    return spec


def supported_model_types() -> list[str]:
    return sorted(REGISTRY)


def spec_for(model_type: str) -> ArchitectureSpec:
    try:
        return REGISTRY[model_type]
    except KeyError:
        raise ValueError(
            f"architecture {model_type!r} is not supported yet; supported: {', '.join(supported_model_types())}"
        ) from None


from . import gpt2, llama  # noqa: E402,F401  (registration)
