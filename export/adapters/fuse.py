"""PEFT's matrices, one pair per source module, placed in lmrt's fused projections.

lmrt fuses q/k/v into one projection and a gated MLP's gate and up (``decoder.projections``). A
projection that fuses k adapted modules takes A = [A_1^T ... A_k^T] ([in, k r], one block of rank
columns per module) and B [k r, out] block-diagonal, each B_j^T in its module's columns: x A B is
then exactly each module's x A_j^T B_j^T side by side, and zeros in the columns of modules the
adapter leaves alone.
"""

from __future__ import annotations

import numpy as np

from ...runtime.manifest import Architecture
from ..architectures.decoder import Layout, projections
from ..errors import AdapterError
from .graph import Site
from .peft_dir import PeftLora


def module_columns(layout: Layout, arch: Architecture, sites: dict[str, Site]) -> dict[str, tuple[str, int, int]]:
    """{source module: (projection, first column, width)} for every module the graph fuses."""
    out = {}
    for i in range(arch.num_layers):
        for name, (_, members) in projections(layout, i).items():
            projection = f"layers.{i}.{name}"
            width = sites[projection].out_features
            if len(members) == 1:
                widths = [width]
            elif name == "qkv":
                q, kv = arch.num_heads * arch.head_size, arch.num_kv_heads * arch.head_size
                widths = [q, kv, kv]
            else:  # gate and up: halves
                widths = [width // len(members)] * len(members)
            start = 0
            for member, w in zip(members, widths):
                out[member] = (projection, start, w)
                start += w
    return out


def fuse(lora: PeftLora, layout: Layout, arch: Architecture, sites: dict[str, Site]) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """{"{projection}.a": [in, k r], "{projection}.b": [k r, out]} for each projection the adapter
    touches, and the source modules it adapts without their layer prefix; AdapterError for a module
    the graph does not have, or one whose sizes are not this model's."""
    columns = module_columns(layout, arch, sites)
    parts: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    targets = set()
    for module, (a, b) in lora.matrices.items():
        if module not in columns:
            raise AdapterError(
                f"the adapter adapts {module}, which this {arch.model_type} model's graph does not have (lmrt adapts "
                "each layer's attention q/k/v/o and MLP projections; the adapter may belong to another architecture)"
            )
        projection, start, width = columns[module]
        site = sites[projection]
        if a.shape[1] != site.in_features or b.shape[0] != width:
            raise AdapterError(
                f"the adapter's {module} maps {a.shape[1]} features to {b.shape[0]}; this model's maps {site.in_features} "
                f"to {width}: the adapter was trained on another base model"
            )
        parts.setdefault(projection, []).append((start, a, b))
        prefix = layout.layer.format(i=int(projection.split(".")[1]))
        targets.add(module[len(prefix) :] if module.startswith(prefix) else module)
    out = {}
    for projection, blocks in parts.items():
        blocks.sort(key=lambda block: block[0])
        a = np.concatenate([block[1].T for block in blocks], axis=1).astype(np.float32)  # [in, k r]
        b = np.zeros((a.shape[1], sites[projection].out_features), np.float32)
        row = 0
        for start, _, lora_b in blocks:
            r = lora_b.shape[1]
            b[row : row + r, start : start + lora_b.shape[0]] = lora_b.T
            row += r
        out[f"{projection}.a"], out[f"{projection}.b"] = a, b
    return out, tuple(sorted(targets))
