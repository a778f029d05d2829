"""How a model directory's numbers are stored, in words, from its manifest: what ``lmrt info``,
``lmrt doctor`` and ``lmrt serve`` say of its weights and activations."""

from __future__ import annotations

from .runtime.manifest import Manifest


def weights_kind(manifest: Manifest) -> str:
    """What the weights are: the quantization's name ("int8", "int4") or the graph's dtype ("float32")."""
    return manifest.quantization.get("name") or manifest.graph.dtype


def precision(manifest: Manifest) -> str:
    """The weights and the activations in words: "int8 weights, float32 activations", or "float32
    weights and activations" for a float graph."""
    weights, activations = weights_kind(manifest), manifest.graph.dtype
    if weights == activations:
        return f"{weights} weights and activations"
    return f"{weights} weights, {activations} activations"


def weights_row(manifest: Manifest, size: int) -> str:
    """``lmrt info``'s "weights" row: "int8 (float32 activations), 12.3 MB on disk", or "float32, ..."."""
    weights, activations = weights_kind(manifest), manifest.graph.dtype
    shown = weights if weights == activations else f"{weights} ({activations} activations)"
    return f"{shown}, {size / 1e6:.1f} MB on disk"
