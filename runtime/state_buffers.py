"""The memory behind a state store: one preallocated buffer per state tensor, and their binding.

A "kv" tensor (an attention layer's keys or values, [rows, heads, capacity, head_size]) grows along
its sequence axis. The graph reads its buffer as ``past`` and writes the same memory as ``present``
(IO binding hands onnxruntime one pointer for both), so a step copies no state: it writes the new
positions of each row and nothing else. A "fixed" tensor ([rows, *shape], a recurrent layer's h or
c) is rewritten whole by every step, so its ``present`` goes to a second buffer of the same shape
and ``commit`` copies the rows a step ran back (a graph may read a state after writing its successor,
so one buffer for both would not be safe); it is small beside the step that computed it. The
snapshots of the fixed tensors (``state_snapshots.py``), by which such a row goes back, live and move
with the rows here too.

On CUDA the buffers live on the device (kv tensors only); moving rows goes through the host there,
while on the CPU it is numpy indexing on the buffers themselves. The store (``state_store.py``)
decides which rows move; this file only moves them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .manifest import Architecture, GraphIO
from .state_snapshots import PER_ROW, Snapshots, fixed_bytes
from .state_spec import StateSpec, kv_cache


class CacheFullError(ValueError):
    """A request would write past the end of the preallocated state."""


def bytes_per_position(tensors: Sequence[StateSpec]) -> int:
    """Bytes one position of one row takes over every growing (kv) tensor."""
    return sum(int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize for t in tensors if t.kind == "kv")


def reserved_bytes(tensors: Sequence[StateSpec], rows: int, capacity: int) -> int:
    """Bytes ``rows`` rows of ``capacity`` positions take: kv tensors' positions, and a fixed tensor's
    state, the buffer its next step writes and its snapshots."""
    return rows * (capacity * bytes_per_position(tensors) + fixed_bytes(tensors) * (2 + PER_ROW))


class StateBuffers:
    """The buffers of ``rows`` x ``capacity`` positions, and a cached binding of the decode batch.
    ``state``: every tensor of a row's state (none: a window graph); None: the KV cache of ``arch``."""

    def __init__(self, arch: Architecture, io: GraphIO, device: str = "cpu", state: Sequence[StateSpec] | None = None):
        self.tensors = kv_cache(arch, io) if state is None else tuple(state)
        self.fixed = any(t.kind == "fixed" for t in self.tensors)
        if self.fixed and device != "cpu":
            raise ValueError("fixed (recurrent) state is kept on the CPU")
        self.device = device  # "cpu" or "cuda"
        self.spare = io.scratch_positions  # kv positions past ``capacity`` that steps write scratch into
        self.version = 0  # bumped whenever the buffers are replaced, so bindings know to follow
        self._binding = None  # (key, binding, logits) of the decode batch
        self.rows = self.capacity = 0
        self.snapshots = Snapshots(self.tensors) if self.fixed else None
        self.reset(1, 1)

    def _shape(self, t: StateSpec, rows: int, capacity: int) -> tuple[int, ...]:
        return (rows, t.shape[0], capacity + self.spare, *t.shape[1:]) if t.kind == "kv" else (rows, *t.shape)

    def empty(self, rows: int, capacity: int) -> list[np.ndarray]:
        """Zeros (every tensor's initial value) for ``rows`` rows of ``capacity`` positions."""
        return [np.zeros(self._shape(t, rows, capacity), t.dtype) for t in self.tensors]

    def reset(self, rows: int, capacity: int) -> None:
        """``rows`` x ``capacity`` of initial state, no snapshots."""
        self.allocate(self.empty(rows, capacity), rows, capacity)
        if self.snapshots is not None:
            self.snapshots.allocate(rows)

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
        if self.snapshots is not None:
            self.snapshots.regrown(rows, keep)

    def move(self, src: list[int], dst: list[int], n: int) -> None:
        """Rows ``dst`` take the first ``n`` positions of rows ``src`` (a fixed tensor: their whole
        state and snapshots), all read before any is written."""
        if self.snapshots is not None:
            self.snapshots.move(src, dst)
        arrays = self.host_arrays()
        for t, full in zip(self.tensors, arrays):
            if t.kind == "fixed":
                full[dst] = full[src]
            elif n:
                full[dst, :, :n] = full[src, :, :n]
        if self.device != "cpu" and n:
            self.allocate(arrays, self.rows, self.capacity)

    def _fixed(self) -> list[np.ndarray]:
        return [full for t, full in zip(self.tensors, self._arrays) if t.kind == "fixed"]

    def snapshot(self, row: int, length: int) -> None:
        """Keep a copy of row ``row``'s fixed tensors, which hold its state at ``length`` positions."""
        self.snapshots.take(row, length, self._fixed())

    def restore(self, row: int, length: int) -> int:
        """Row ``row``'s fixed tensors back to its latest snapshot at or before ``length`` (none: their
        initial value); returns the length they hold now."""
        return self.snapshots.restore(row, length, self._fixed())

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

    def binding(
        self, session, start: int, count: int, batch: bool, logits_name: str, logits_shape: tuple, logits_dtype, constants=None,
        constants_key=0,
    ):
        """An IO binding of rows [start, start + count) with a logits output of ``logits_shape``, and that
        buffer; ``constants(binding)`` binds what all share (adapters) to a new one. The decode batch's
        (``batch``) binding is kept while its rows and ``constants_key`` (what the constants are) stay, its
        buffer while the shape holds (a fresh one per step would cost page faults); other ranges get
        fresh ones."""
        key = (self.version, count, constants_key)
        if batch and self._binding is not None and self._binding[0] == key:
            binding, logits = self._binding[1], self._binding[2]
        else:
            binding, logits = session.io_binding(), None
            self.bind(binding, start, count)
            if constants is not None:
                constants(binding)
        if logits is None or logits.shape != logits_shape:
            logits = np.empty(logits_shape, logits_dtype)
            binding.bind_output(logits_name, "cpu", 0, logits_dtype, list(logits_shape), logits.ctypes.data)
        if batch:
            self._binding = (key, binding, logits)
        return binding, logits

    def data_pointers(self) -> list[int]:
        return [value.data_ptr() for value in self._values]


def regrown_array(kept: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Zeros of ``shape`` with ``kept`` in its leading corner."""
    out = np.zeros(shape, dtype=kept.dtype)
    out[tuple(slice(0, n) for n in kept.shape)] = kept
    return out
