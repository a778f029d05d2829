"""Architectures lmrt can export, keyed by the source's ``model_type``.

Each family module registers an ``ArchitectureSpec`` made by ``decoder``: where the family keeps its
weights (a ``Layout``) and how its config chooses among the variations of the one decoder builder
(a function returning a ``Plan``). Adding a family is adding a module of declarations.

Importing this package needs numpy and onnx only, so an unsupported model is refused before torch
or transformers are imported.
"""

from __future__ import annotations

from . import gemma2, gemma3, gpt2, granite, llama, phi3, qwen3, smollm3  # noqa: F401  (registration)
from .spec import REGISTRY, ArchitectureSpec, Weights, spec_for, supported_gguf_architectures, supported_model_types

__all__ = [
    "REGISTRY",
    "ArchitectureSpec",
    "Weights",
    "spec_for",
    "supported_gguf_architectures",
    "supported_model_types",
]
