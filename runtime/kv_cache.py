"""The key/value cache carried between decode steps.

This is the seam for faster caches: the model runner only calls ``feeds()``, ``output_names`` and
``update()``; the decode loops call ``select()`` to drop finished rows and to follow beams. Today the cache keeps the ``present`` arrays onnxruntime returns and feeds them back as
``past`` on the next step; a preallocated in-place buffer bound with IO binding can replace it without
the Generator noticing.
"""

from __future__ import annotations

import numpy as np

from .manifest import Architecture, GraphIO


class KVCache:
    """Past keys and values of every layer, each [batch, kv_heads, length, head_size]."""

    def __init__(self, arch: Architecture, io: GraphIO, batch: int = 1):
        self._arch = arch
        self._io = io
        self._dtype = np.dtype(io.kv_dtype)
        self._input_names = [
            name.format(layer=i) for i in range(arch.num_layers) for name in (io.past_key, io.past_value)
        ]
        self.output_names = [
            name.format(layer=i) for i in range(arch.num_layers) for name in (io.present_key, io.present_value)
        ]
        self.reset(batch)

    def reset(self, batch: int = 1) -> None:
        """Empty the cache (past length 0) for a new request of ``batch`` sequences."""
        empty = np.zeros((batch, self._arch.num_kv_heads, 0, self._arch.head_size), dtype=self._dtype)
        self.batch = batch
        self._arrays = [empty] * len(self._input_names)

    @property
    def length(self) -> int:
        """Number of positions cached so far."""
        return self._arrays[0].shape[2]

    def feeds(self) -> dict[str, np.ndarray]:
        return dict(zip(self._input_names, self._arrays))

    def select(self, rows) -> None:
        """Keep the cache rows ``rows`` (int [new_batch]), in that order; a row may repeat, as when
        several beams or samples continue one prompt."""
        rows = np.asarray(rows, dtype=np.int64)
        self._arrays = [a[rows] for a in self._arrays]
        self.batch = rows.shape[0]

    def update(self, present: list[np.ndarray]) -> None:
        """Take the step's present outputs (in ``output_names`` order) as the next step's past."""
        if len(present) != len(self._arrays):
            raise ValueError(f"expected {len(self._arrays)} present tensors, got {len(present)}")
        self._arrays = list(present)
