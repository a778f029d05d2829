"""The manifest's ``lora`` section: the graph's LoRA inputs and the adapters the directory holds.

A graph rewritten for adapters (``lmrt adapter``) adds to each linear projection y = x W of every
layer, at each position, the term x A B of its row's adapter, computed per adapter in groups: the
projection's ``a`` input (float [groups, in_features, rank]) holds the A matrices of a step's
adapters, its ``b`` input (float [groups, rank, out_features]) their B matrices; three inputs all
projections share place the step's positions in the groups: ``index`` (int64 [groups, places]: the
positions, batch and sequence flattened, of each group's rows, padded), ``valid`` (float
[groups, places, 1]: 1 at a position, 0 at padding) and ``back`` (int64 [batch, seq, 2]: each
position's group and place; a row without an adapter points at a padding place). ``adapters.py``
fills them. A manifest without the section has a graph without these inputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .model_dir import ManifestError
from .paths import FILE
from .typed_json import typed

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a file name and a model id alike


@dataclass(frozen=True)
class LoraInput:
    projection: str  # lmrt's name of the projection: "layers.{i}.qkv", ".out", ".up" or ".down"
    a: str  # the graph input [groups, in_features, rank]: the A matrices of a step's adapters
    b: str  # the graph input [groups, rank, out_features]: their B matrices (times their scales)
    in_features: int
    out_features: int


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    # adapters/NAME/lora.npz: "{projection}.a" [in_features, rank] and "{projection}.b" [rank, out_features]
    # for each projection it adapts (PEFT's matrices, fused as the graph fuses its projections)
    file: str = field(metadata=FILE)
    sha256: str  # of that file
    rank: int  # PEFT's r
    alpha: float  # PEFT's lora_alpha
    use_rslora: bool
    scale: float  # alpha / r (rsLoRA: alpha / sqrt(r)); B is multiplied by it when loaded
    targets: tuple[str, ...]  # the source modules it adapts, without their layer ("self_attn.q_proj")
    base_model: str = ""  # PEFT's base_model_name_or_path, as the adapter names it
    # perplexity on an evaluation text with the adapter and without it, measured when it was added:
    # {"eval_text", "tokens", "perplexity", "base_perplexity"} (empty: not measured)
    quality: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Lora:
    inputs: tuple[LoraInput, ...] = ()
    adapters: tuple[AdapterEntry, ...] = ()
    index: str = "lora.index"  # the graph inputs all projections share (the module's docstring)
    valid: str = "lora.valid"
    back: str = "lora.back"

    def entry(self, name: str) -> AdapterEntry | None:
        return next((a for a in self.adapters if a.name == name), None)


def read_lora(value: Any) -> Lora | None:
    """The manifest's ``lora`` section read into a Lora (None when absent), or ManifestError."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ManifestError("malformed manifest: lora must be an object")
    data = dict(value)
    inputs, adapters = data.pop("inputs", []), data.pop("adapters", [])
    if not isinstance(inputs, list) or not isinstance(adapters, list):
        raise ManifestError("malformed manifest: lora.inputs and lora.adapters must be lists")
    if any(isinstance(item, dict) and "mask" in item for item in inputs):
        raise ManifestError("the graph's adapter inputs are of an older lmrt (row masks): export the model again and add its adapters again")
    entries = []
    for i, item in enumerate(adapters):
        if isinstance(item, dict) and isinstance(item.get("targets"), list):
            item = {**item, "targets": tuple(item["targets"])}
        entry = typed(AdapterEntry, item, f"lora.adapters[{i}]")
        if not ADAPTER_NAME.fullmatch(entry.name):
            raise ManifestError(f"malformed manifest: lora.adapters[{i}].name {entry.name!r} is not an adapter name")
        entries.append(entry)
    if len({e.name for e in entries}) != len(entries):
        raise ManifestError("malformed manifest: lora.adapters names an adapter twice")
    read = tuple(typed(LoraInput, item, f"lora.inputs[{i}]") for i, item in enumerate(inputs))
    return typed(Lora, {**data, "inputs": read, "adapters": tuple(entries)}, "lora")
