"""What one tensor of a row's decoding state is: the manifest's generic state description.

Two kinds:
  "kv"     grows along a sequence axis: [rows, shape[0], positions, *shape[1:]] (an attention
           layer's keys or values; a step writes its new positions in place);
  "fixed"  the same shape every step: [rows, *shape] (a recurrent layer's h or c); a step reads the
           row's state and writes its successor.
Every state starts as ``initial`` ("zeros", the one initial value there is). A manifest that lists no
state (every one written before recurrent models) has the KV cache its architecture describes: a key
and a value per layer; a graph decoded by re-running its window (``graph.decoding`` "window") has
none: the row's tokens are all it keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .model_dir import ManifestError
from .typed_json import typed

KINDS = ("kv", "fixed")
# "step": a graph stepped over its state bound in place (rows padded, an attention mask);
# "declared": a module's own state, each tensor fed at exactly its rows' length and returned grown
# (kv) or replaced (fixed), rows of one length run together; "window": re-run over the whole window
DECODINGS = ("step", "declared", "window")
DTYPES = ("float32", "float16")
INITIAL_VALUES = ("zeros",)


@dataclass(frozen=True)
class StateSpec:
    past: str  # the graph's input: the row's state before the step
    present: str  # the graph's output: after it
    kind: str = "kv"  # one of KINDS
    shape: tuple[int, ...] = ()  # per row; "kv": without the positions axis (heads, head size)
    dtype: str = "float32"
    initial: str = "zeros"


def read_state(value: Any) -> tuple[StateSpec, ...]:
    """The manifest's ``graph.state`` list read into StateSpecs, or ManifestError in one line."""
    if not isinstance(value, list):
        raise ManifestError("malformed manifest: graph.state must be a list")
    specs = []
    for i, item in enumerate(value):
        name = f"graph.state[{i}]"
        if isinstance(item, dict) and isinstance(item.get("shape"), list):
            item = {**item, "shape": tuple(item["shape"])}
        spec = typed(StateSpec, item, name)
        for field, allowed in (("kind", KINDS), ("dtype", DTYPES), ("initial", INITIAL_VALUES)):
            if getattr(spec, field) not in allowed:
                raise ManifestError(f"malformed manifest: {name}.{field} must be one of {', '.join(allowed)}, got {getattr(spec, field)!r}")
        if not spec.shape or any(n < 1 for n in spec.shape) or (spec.kind == "kv" and len(spec.shape) < 2):
            raise ManifestError(f"malformed manifest: {name}.shape must hold positive sizes ({spec.kind}), got {list(spec.shape)}")
        specs.append(spec)
    if len({s.past for s in specs} | {s.present for s in specs}) != 2 * len(specs):
        raise ManifestError("malformed manifest: graph.state names a tensor twice")
    return tuple(specs)


def kv_cache(arch, io) -> tuple[StateSpec, ...]:
    """The KV cache of a decoder whose manifest lists no state: a key and a value per layer."""
    return tuple(
        StateSpec(past.format(layer=i), present.format(layer=i), "kv", (arch.num_kv_heads, arch.head_size), io.kv_dtype)
        for i in range(arch.num_layers)
        for past, present in ((io.past_key, io.present_key), (io.past_value, io.present_value))
    )


def state_of(manifest) -> tuple[StateSpec, ...]:
    """Every tensor of a row's state: those the manifest declares, none for a window graph, or the
    KV cache of its architecture."""
    graph = manifest.graph
    if graph.state or graph.decoding == "window":
        return graph.state
    return kv_cache(manifest.architecture, graph.io)
