"""The key/value cache, preallocated and updated in place.

Per layer there is one key and one value buffer [batch, kv_heads, capacity, head_size]. The graph
reads a buffer as ``past`` and writes the same memory as ``present`` (IO binding hands onnxruntime the
same pointer for both), so a decode step copies no cache: it writes the new position of each row and
nothing else. ``lengths[b]`` counts the positions row b holds; rows may differ.

On CUDA the buffers live on the device and never come back during decoding. Reordering rows
(``select``: beams, finished rows leaving a batch) goes through the host there; on the CPU it is one
numpy gather.
"""

from __future__ import annotations

import numpy as np

from .manifest import Architecture, GraphIO


class CacheFullError(ValueError):
    """A request would write past the end of the preallocated cache."""


class KVCache:
    def __init__(self, arch: Architecture, io: GraphIO, device: str = "cpu"):
        self._arch = arch
        self._dtype = np.dtype(io.kv_dtype)
        self._device = device  # "cpu" or "cuda"
        self.names = [  # (past input, present output) per buffer
            (past.format(layer=i), present.format(layer=i))
            for i in range(arch.num_layers)
            for past, present in ((io.past_key, io.present_key), (io.past_value, io.present_value))
        ]
        self.version = 0  # bumped whenever the buffers are replaced, so bindings know to follow
        self.reset(1, 1)

    def reset(self, batch: int, capacity: int) -> None:
        """Empty cache for ``batch`` rows of up to ``capacity`` positions each."""
        a = self._arch
        shape = (batch, a.num_kv_heads, capacity, a.head_size)
        self._set([np.zeros(shape, self._dtype) for _ in self.names], np.zeros(batch, dtype=np.int64))

    @property
    def batch(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def capacity(self) -> int:
        return int(self._shape[2])

    def select(self, rows) -> None:
        """Keep the rows ``rows`` (int [new_batch]), in that order; a row may repeat, as when several
        beams or samples continue one prompt."""
        rows = np.asarray(rows, dtype=np.int64)
        used = int(self.lengths.max(initial=0))
        current = self._arrays if self._device == "cpu" else [value.numpy() for value in self._values]
        kept = []
        for full in current:
            new = np.zeros((rows.shape[0], *self._shape[1:]), self._dtype)
            new[:, :, :used] = full[rows, :, :used]  # only the positions in use
            kept.append(new)
        self._set(kept, self.lengths[rows])

    def bind(self, binding, row: int | None = None) -> None:
        """Bind every buffer as both past input and present output of ``binding``: the whole batch,
        or the single row ``row`` (a [1, ...] view, for prefilling one prompt of a batch)."""
        shape = list(self._shape)
        offset = 0
        if row is not None:
            offset = row * int(np.prod(shape[1:])) * self._dtype.itemsize
            shape[0] = 1
        for (past, present), value in zip(self.names, self._values):
            ptr = value.data_ptr() + offset
            binding.bind_input(past, self._device, 0, self._dtype, shape, ptr)
            binding.bind_output(present, self._device, 0, self._dtype, shape, ptr)

    def _set(self, arrays: list[np.ndarray], lengths: np.ndarray) -> None:
        from .session import import_onnxruntime

        ort = import_onnxruntime()
        self._shape = arrays[0].shape
        self.lengths = lengths
        if self._device == "cpu":
            self._arrays = arrays  # the OrtValues below share this memory: keep it alive
            self._values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        else:
            self._arrays = []
            self._values = [ort.OrtValue.ortvalue_from_numpy(a, self._device, 0) for a in arrays]
        self.version += 1
