"""The decoding state's memory in words, the same for every kind of model: the lines of
``lmrt serve`` (what its slots reserve), ``lmrt info`` (what one sequence takes) and ``lmrt bench``."""

from __future__ import annotations

from typing import Sequence

from .runtime.state_buffers import bytes_per_position, reserved_bytes
from .runtime.state_snapshots import PER_ROW, fixed_bytes
from .runtime.state_spec import StateSpec


def size(n: float) -> str:
    """``n`` bytes as "512 B", "4.6 kB", "1.5 MB", "96 MB" or "2.1 GB"."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value >= 100 else f"{value:.1f} {unit}"
    return f"{n:.0f} B"


def _sizes(tensors: Sequence[StateSpec], rows: int, capacity: int) -> tuple[str, str]:
    """("KV cache 96 MB", "state 2 x 4.6 kB" or both joined with "and"; what a fixed state's size holds)."""
    parts, note = [], ""
    if bytes_per_position(tensors):
        parts.append(f"KV cache {size(reserved_bytes([t for t in tensors if t.kind == 'kv'], rows, capacity))}")
    if fixed_bytes(tensors):
        parts.append(f"state {rows} x {size(reserved_bytes([t for t in tensors if t.kind == 'fixed'], 1, capacity))}")
        note = f" (each: a row's state, the buffer its next step writes and {PER_ROW} snapshots)"
    return " and ".join(parts), note


def state_words(tensors: Sequence[StateSpec], rows: int, capacity: int) -> str:
    """What ``rows`` rows of ``capacity`` positions of this state take: "KV cache 96 MB", "state 2 x
    4.6 kB (each: ...)", both, or "no state" (a window graph keeps a row's tokens only)."""
    if not tensors:
        return "no state"
    sizes, note = _sizes(tensors, rows, capacity)
    return sizes + note


def reserved_line(tensors: Sequence[StateSpec], rows: int, capacity: int) -> str:
    """The part of ``lmrt serve``'s start line that says what its slots reserve."""
    if not tensors:
        return "no state: each step runs a slot's tokens again"
    sizes, note = _sizes(tensors, rows, capacity)
    return f"{sizes} reserved{note}"


def per_sequence(tensors: Sequence[StateSpec]) -> str:
    """What one sequence's state takes, for ``lmrt info``: "4.6 kB per token", "512 B per sequence
    (and up to 8 snapshots of it)", or both."""
    parts = []
    if bytes_per_position(tensors):
        parts.append(f"{size(bytes_per_position(tensors))} per token")
    if fixed_bytes(tensors):
        parts.append(f"{size(fixed_bytes(tensors))} per sequence (and up to {PER_ROW} snapshots of it)")
    return " + ".join(parts)
