"""The memory behind a state store: one preallocated buffer per state tensor, and their binding.

Today every state tensor is a key or a value of one attention layer, [rows, kv_heads, capacity,
head_size], that grows along its sequence axis ("kv"). The graph reads a buffer as ``past`` and writes
the same memory as ``present`` (IO binding hands onnxruntime one pointer for both), so a step copies
no state: it writes the new positions of each row and nothing else.

On CUDA the buffers live on the device; moving rows goes through the host there, while on the CPU it
is numpy indexing on the buffers themselves. The store (``state_store.py``) decides which rows move;
this file only moves them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .manifest import Architecture, GraphIO


@dataclass(frozen=True)
class StateTensor:
    """One tensor of a row's state: the graph's input and output names and its kind ("kv": grows
    along axis 2 of [rows, heads, positions, size])."""

    past: str
    present: str
    kind: str = "kv"


def state_tensors(arch: Architecture, io: GraphIO) -> list[StateTensor]:
    """The state tensors of a decoder graph, as its manifest names them."""
    return [
        StateTensor(past.format(layer=i), present.format(layer=i))
        for i in range(arch.num_layers)
        for past, present in ((io.past_key, io.present_key), (io.past_value, io.present_value))
    ]


class StateBuffers:
    """The buffers of ``rows`` x ``capacity`` positions, and a cached binding of the decode batch."""

    def __init__(self, arch: Architecture, io: GraphIO, device: str = "cpu"):
        self.tensors = state_tensors(arch, io)
        self._per_row = (arch.num_kv_heads, arch.head_size)
        self.dtype = np.dtype(io.kv_dtype)
        self.device = device  # "cpu" or "cuda"
        self.version = 0  # bumped whenever the buffers are replaced, so bindings know to follow
        self.allocate([self.empty(1, 1)])

    @staticmethod
    def bytes_per_position(arch: Architecture, io: GraphIO) -> int:
        """Bytes one position of one row takes over all layers, keys and values."""
        return 2 * arch.num_layers * arch.num_kv_heads * arch.head_size * np.dtype(io.kv_dtype).itemsize

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    def empty(self, rows: int, capacity: int) -> np.ndarray:
        heads, size = self._per_row
        return np.zeros((rows, heads, capacity, size), self.dtype)

    def allocate(self, arrays: list[np.ndarray]) -> None:
        """Hold ``arrays`` (one per tensor; a single one is repeated as zeros of its shape)."""
        from .session import import_onnxruntime

        ort = import_onnxruntime()
        if len(arrays) == 1 and len(self.tensors) > 1:
            arrays = [arrays[0]] + [np.zeros_like(arrays[0]) for _ in self.tensors[1:]]
        self._shape = arrays[0].shape
        if self.device == "cpu":
            self._arrays = arrays  # the OrtValues below share this memory: keep it alive
            self._values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        else:
            self._arrays = []
            self._values = [ort.OrtValue.ortvalue_from_numpy(a, self.device, 0) for a in arrays]
        self.version += 1

    def host_arrays(self) -> list[np.ndarray]:
        """The buffers as numpy arrays (on CUDA, copies from the device)."""
        return self._arrays if self.device == "cpu" else [value.numpy() for value in self._values]

    def regrown(self, rows: int, capacity: int, keep: list[int], used: int) -> None:
        """New buffers of ``rows`` x ``capacity`` whose first rows hold the first ``used`` positions
        of the rows ``keep``, in that order."""
        arrays = []
        for full in self.host_arrays():
            new = self.empty(rows, capacity)
            new[: len(keep), :, :used] = full[keep, :, :used]
            arrays.append(new)
        self.allocate(arrays)

    def move(self, src: list[int], dst: list[int], n: int) -> None:
        """Rows ``dst`` take the first ``n`` positions of rows ``src`` (all read before any is written)."""
        if n == 0:
            return
        arrays = self.host_arrays()
        for full in arrays:
            full[dst, :, :n] = full[src, :, :n]
        if self.device != "cpu":
            self.allocate(arrays)

    def bind(self, binding, start: int, count: int) -> None:
        """Bind every buffer as both past input and present output of ``binding``, for the rows
        [start, start + count)."""
        shape = [count, *self._shape[1:]]
        offset = start * int(np.prod(self._shape[1:])) * self.dtype.itemsize
        for tensor, value in zip(self.tensors, self._values):
            ptr = value.data_ptr() + offset
            binding.bind_input(tensor.past, self.device, 0, self.dtype, shape, ptr)
            binding.bind_output(tensor.present, self.device, 0, self.dtype, shape, ptr)

    def data_pointers(self) -> list[int]:
        return [value.data_ptr() for value in self._values]
