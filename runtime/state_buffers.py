"""The memory behind a state store: one preallocated buffer per state tensor, and their binding.

A "kv" tensor (an attention layer's keys or values, [rows, heads, capacity, head_size]) grows along
its sequence axis. The graph reads its buffer as ``past`` and writes the same memory as ``present``
(IO binding hands onnxruntime one pointer for both), so a step copies no state: it writes the new
positions of each row and nothing else. A "fixed" tensor ([rows, *shape], a recurrent layer's h or
c) is rewritten whole by every step, so its ``present`` goes to a second buffer of the same shape
and ``commit`` copies the rows a step ran back (a graph may read a state after writing its successor,
so one buffer for both would not be safe); it is small beside the step that computed it.

On CUDA the buffers live on the device (kv tensors only); moving rows goes through the host there,
while on the CPU it is numpy indexing on the buffers themselves. The store (``state_store.py``)
decides which rows move; this file only moves them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .manifest import Architecture, GraphIO
from .state_spec import StateSpec, kv_cache


class CacheFullError(ValueError):
    """A request would write past the end of the preallocated state."""


class RollbackError(ValueError):
    """A row's fixed (recurrent) state cannot go back to an earlier position: no snapshots are kept."""


def bytes_per_position(tensors: Sequence[StateSpec]) -> int:
    """Bytes one position of one row takes over every growing (kv) tensor."""
    return sum(int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize for t in tensors if t.kind == "kv")


class StateBuffers:
    """The buffers of ``rows`` x ``capacity`` positions, and a cached binding of the decode batch.
    ``state``: every tensor of a row's state (none: a window graph); None: the KV cache of ``arch``."""

    def __init__(self, arch: Architecture, io: GraphIO, device: str = "cpu", state: Sequence[StateSpec] | None = None):
        self.tensors = kv_cache(arch, io) if state is None else tuple(state)
        self.fixed = any(t.kind == "fixed" for t in self.tensors)
        if self.fixed and device != "cpu":
            raise ValueError("fixed (recurrent) state is kept on the CPU")
        self.device = device  # "cpu" or "cuda"
        self.version = 0  # bumped whenever the buffers are replaced, so bindings know to follow
        self.rows = self.capacity = 0
        self.allocate(self.empty(1, 1), 1, 1)

    def _shape(self, t: StateSpec, rows: int, capacity: int) -> tuple[int, ...]:
        return (rows, t.shape[0], capacity, *t.shape[1:]) if t.kind == "kv" else (rows, *t.shape)

    def empty(self, rows: int, capacity: int) -> list[np.ndarray]:
        """Zeros (every tensor's initial value) for ``rows`` rows of ``capacity`` positions."""
        return [np.zeros(self._shape(t, rows, capacity), t.dtype) for t in self.tensors]

    def allocate(self, arrays: list[np.ndarray], rows: int, capacity: int) -> None:
        """Hold ``arrays`` (one per tensor, in the order of ``tensors``) of ``rows`` x ``capacity``."""
        from .session import import_onnxruntime

        ort = import_onnxruntime()
        self.rows, self.capacity = rows, capacity
        if self.device == "cpu":
            self._arrays = arrays  # the OrtValues below share this memory: keep it alive
            self._values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        else:
            self._arrays = []
            self._values = [ort.OrtValue.ortvalue_from_numpy(a, self.device, 0) for a in arrays]
        self._next = [np.empty_like(a) if t.kind == "fixed" else None for t, a in zip(self.tensors, arrays)]
        self.version += 1

    def host_arrays(self) -> list[np.ndarray]:
        """The buffers as numpy arrays (on CUDA, copies from the device)."""
        return self._arrays if self.device == "cpu" else [value.numpy() for value in self._values]

    def regrown(self, rows: int, capacity: int, keep: list[int], used: int) -> None:
        """New buffers of ``rows`` x ``capacity`` whose first rows hold the first ``used`` positions
        of the rows ``keep`` (a fixed tensor: their whole state), in that order."""
        arrays = self.empty(rows, capacity)
        for t, full, new in zip(self.tensors, self.host_arrays(), arrays):
            if t.kind == "kv":
                new[: len(keep), :, :used] = full[keep, :, :used]
            else:
                new[: len(keep)] = full[keep]
        self.allocate(arrays, rows, capacity)

    def move(self, src: list[int], dst: list[int], n: int) -> None:
        """Rows ``dst`` take the first ``n`` positions of rows ``src`` (a fixed tensor: their whole
        state), all read before any is written."""
        arrays = self.host_arrays()
        for t, full in zip(self.tensors, arrays):
            if t.kind == "fixed":
                full[dst] = full[src]
            elif n:
                full[dst, :, :n] = full[src, :, :n]
        if self.device != "cpu" and n:
            self.allocate(arrays, self.rows, self.capacity)

    def clear(self, rows: list[int]) -> None:
        """Fixed tensors of ``rows`` back to their initial value (the rows start again from nothing)."""
        for t, full in zip(self.tensors, self._arrays):
            if t.kind == "fixed":
                full[rows] = 0

    def commit(self, start: int, count: int) -> None:
        """After a step over rows [start, start + count): their fixed tensors take what it wrote."""
        for full, written in zip(self._arrays, self._next):
            if written is not None:
                full[start : start + count] = written[start : start + count]

    def exact(self, rows: np.ndarray, length: int) -> dict[str, np.ndarray]:
        """The past inputs of rows ``rows`` that all hold ``length`` positions, each state at exactly
        that length (a declared state's graph takes no padding); CPU buffers only."""
        return {t.past: full[rows, :, :length] if t.kind == "kv" else full[rows] for t, full in zip(self.tensors, self._arrays)}

    def take(self, rows: np.ndarray, length: int, presents: Sequence[np.ndarray]) -> None:
        """A declared state's step wrote ``presents`` for ``rows`` (of ``length`` positions before it):
        a kv tensor keeps its new positions, a fixed one's successor waits for ``commit``."""
        for t, full, written, present in zip(self.tensors, self._arrays, self._next, presents):
            if t.kind == "kv":
                full[rows, :, length : present.shape[2]] = present[:, :, length:]
            else:
                written[rows] = present

    def bind(self, binding, start: int, count: int) -> None:
        """Bind every buffer as the past input of ``binding`` for the rows [start, start + count),
        and as its present output (a kv tensor: the same memory; a fixed one: its second buffer)."""
        for t, value, written in zip(self.tensors, self._values, self._next):
            shape = [count, *self._shape(t, 1, self.capacity)[1:]]
            dtype = np.dtype(t.dtype)
            offset = start * int(np.prod(shape[1:])) * dtype.itemsize
            ptr = value.data_ptr() + offset
            binding.bind_input(t.past, self.device, 0, dtype, shape, ptr)
            out = ptr if written is None else written.ctypes.data + offset
            binding.bind_output(t.present, self.device, 0, dtype, shape, out)

    def data_pointers(self) -> list[int]:
        return [value.data_ptr() for value in self._values]


def regrown_array(kept: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Zeros of ``shape`` with ``kept`` in its leading corner."""
    out = np.zeros(shape, dtype=kept.dtype)
    out[tuple(slice(0, n) for n in kept.shape)] = kept
    return out
