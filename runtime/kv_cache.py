"""The key/value cache: preallocated rows, updated in place, and the bookkeeping of who uses which row.

Per layer there is one key and one value buffer [rows, kv_heads, capacity, head_size]. The graph
reads a buffer as ``past`` and writes the same memory as ``present`` (IO binding hands onnxruntime the
same pointer for both), so a step copies no cache: it writes the new positions of each row and nothing
else. Each row remembers the token ids whose keys and values it holds (``tokens``) and how many
(``lengths``).

Rows [0, active) are the decode batch: one step advances all of them together, each at its own
length. The other rows are either claimed by a sequence that is still being prefilled (it is fed
through a one-row view) or free. A free row keeps what it holds, so a new sequence that starts with
the same tokens reuses them (``claim`` picks the free row sharing the longest prefix and truncates it
there). ``activate`` and ``release`` move a row into and out of the decode batch by swapping it with
the batch's edge, so the batch stays contiguous and an idle row costs no compute. Rows are looked up
by their owner (any object), since swaps move them.

On CUDA the buffers live on the device. Moving rows (swaps, ``select`` for beams) goes through the
host there; on the CPU it is numpy indexing on the buffers themselves.
"""

from __future__ import annotations

from typing import Any, Hashable, Iterable

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
        self._tick = 0  # release order of free rows: the least recently used is reused first
        self.reset(1, 1, active=0)

    @staticmethod
    def bytes_per_position(arch: Architecture, io: GraphIO) -> int:
        """Bytes one position of one row takes over all layers, keys and values."""
        return 2 * arch.num_layers * arch.num_kv_heads * arch.head_size * np.dtype(io.kv_dtype).itemsize

    # --- shape ---------------------------------------------------------------------------------

    def reset(self, rows: int, capacity: int, active: int | None = None) -> None:
        """``rows`` empty rows of up to ``capacity`` positions each, none owned; the first ``active``
        of them (default: all) form the decode batch."""
        a = self._arch
        shape = (rows, a.num_kv_heads, capacity, a.head_size)
        self._set([np.zeros(shape, self._dtype) for _ in self.names])
        self._lengths = np.zeros(rows, dtype=np.int64)
        self._tokens = np.zeros((rows, capacity), dtype=np.int64)
        self._owners: list[Hashable | None] = [None] * rows
        self._row: dict[Hashable, int] = {}
        self._released = np.zeros(rows, dtype=np.int64)
        self.active = rows if active is None else active

    def resize(self, rows: int, capacity: int, keep: Iterable[int]) -> None:
        """New buffers of ``rows`` x ``capacity`` holding the rows ``keep`` (every owned row among
        them) at the front, in that order; the other rows start empty. Owned rows keep their owners,
        and the decode batch its order."""
        keep = list(keep)
        owned = [r for r in range(self.rows) if self._owners[r] is not None]
        if not set(owned) <= set(keep) or len(keep) > rows:
            raise ValueError("resize must keep every owned row and fit them")
        if keep[: self.active] != list(range(self.active)):
            raise ValueError("resize must keep the decode batch first, in order")
        used = int(self._lengths[keep].max(initial=0))
        if used > capacity:
            raise CacheFullError(f"a row holds {used} positions, more than the new capacity {capacity}")
        old = self._host_arrays()
        a = self._arch
        arrays = []
        for full in old:
            new = np.zeros((rows, a.num_kv_heads, capacity, a.head_size), self._dtype)
            new[: len(keep), :, :used] = full[keep, :, :used]
            arrays.append(new)
        tokens = np.zeros((rows, capacity), dtype=np.int64)
        tokens[: len(keep), :used] = self._tokens[keep, :used]
        lengths = np.zeros(rows, dtype=np.int64)
        lengths[: len(keep)] = self._lengths[keep]
        released = np.zeros(rows, dtype=np.int64)
        released[: len(keep)] = self._released[keep]
        owners = [self._owners[r] for r in keep] + [None] * (rows - len(keep))
        self._set(arrays)
        self._tokens, self._lengths, self._released, self._owners = tokens, lengths, released, owners
        self._row = {o: r for r, o in enumerate(owners) if o is not None}

    @property
    def rows(self) -> int:
        return int(self._lengths.shape[0])

    @property
    def batch(self) -> int:
        """Rows in the decode batch (the same as ``active``)."""
        return self.active

    @property
    def capacity(self) -> int:
        return int(self._shape[2])

    @property
    def lengths(self) -> np.ndarray:
        """int64 [rows]: positions each row holds (read-only)."""
        view = self._lengths.view()
        view.flags.writeable = False
        return view

    def tokens(self, row: int) -> np.ndarray:
        """int64 [length]: the token ids whose keys and values row ``row`` holds (read-only)."""
        view = self._tokens[row, : self._lengths[row]]
        view.flags.writeable = False
        return view

    def free_rows(self) -> int:
        return sum(o is None for o in self._owners[self.active :])

    def owners(self) -> list[Any]:
        """The owners of the decode batch's rows, in row order."""
        return self._owners[: self.active]

    def row_of(self, owner: Hashable) -> int:
        return self._row[owner]

    def owns(self, owner: Hashable) -> bool:
        """Whether ``owner`` holds a row."""
        return owner in self._row

    def owned_rows(self) -> list[int]:
        """Rows with an owner, in row order (the decode batch first)."""
        return [r for r, o in enumerate(self._owners) if o is not None]

    # --- who uses which row ------------------------------------------------------------------

    def claim(self, owner: Hashable, ids: np.ndarray | None = None) -> int:
        """Give ``owner`` a free row outside the decode batch and return how many leading tokens of
        ``ids`` it already holds (at most all but the last, so a prefill always has a token to
        compute logits from). Without ``ids`` or a shared prefix, the least recently used row."""
        free = [r for r in range(self.active, self.rows) if self._owners[r] is None]
        if not free:
            raise CacheFullError("no free cache row")
        best, shared = free[int(np.argmin(self._released[free]))], 0
        if ids is not None and len(ids) > 1:
            for r in free:
                n = self.shared_prefix(r, ids)
                if n > shared or (n == shared and n > 0 and self._released[r] < self._released[best]):
                    best, shared = r, n
        shared = min(shared, len(ids) - 1) if ids is not None else 0
        self._owners[best] = owner
        self._row[owner] = best
        self._lengths[best] = shared
        return shared

    def shared_prefix(self, row: int, ids: np.ndarray) -> int:
        """How many leading tokens of ``ids`` row ``row`` holds."""
        n = min(int(self._lengths[row]), len(ids))
        if n == 0:
            return 0
        differ = np.flatnonzero(self._tokens[row, :n] != ids[:n])
        return int(differ[0]) if differ.size else n

    def activate(self, owner: Hashable) -> None:
        """Move ``owner``'s row into the decode batch (at its end)."""
        row = self._row[owner]
        if row < self.active:
            raise ValueError("that row is already in the decode batch")
        self._swap(row, self.active)
        self.active += 1

    def release(self, owner: Hashable) -> None:
        """Give ``owner``'s row back; it leaves the decode batch and keeps its contents for reuse."""
        row = self._row.pop(owner)
        if row < self.active:
            self._swap(row, self.active - 1)
            row = self.active - 1
            self.active -= 1
        self._owners[row] = None
        self._tick += 1
        self._released[row] = self._tick

    def truncate(self, row: int, length: int) -> None:
        """Forget row ``row``'s positions from ``length`` on (they stay in memory, unused)."""
        if not 0 <= length <= self._lengths[row]:
            raise ValueError(f"cannot truncate a row of {self._lengths[row]} positions to {length}")
        self._lengths[row] = length

    def copy_row(self, src: int, dst: int) -> None:
        """Make row ``dst`` hold what row ``src`` holds (several samples continuing one prompt)."""
        n = int(self._lengths[src])
        self._move_positions([src], [dst], n)
        self._tokens[dst, :n] = self._tokens[src, :n]
        self._lengths[dst] = n

    def select(self, rows) -> None:
        """Make the rows ``rows`` (int [new_batch], in that order, repeats allowed) the whole cache
        and its decode batch; owners are dropped (beam search reorders its beams this way)."""
        rows = np.asarray(rows, dtype=np.int64)
        used = int(self._lengths.max(initial=0))
        kept = []
        for full in self._host_arrays():
            new = np.zeros((rows.shape[0], *self._shape[1:]), self._dtype)
            new[:, :, :used] = full[rows, :, :used]  # only the positions in use
            kept.append(new)
        tokens, lengths = self._tokens[rows], self._lengths[rows]
        self._set(kept)
        self._tokens, self._lengths = tokens, lengths
        self._owners = [None] * rows.shape[0]
        self._row = {}
        self._released = np.zeros(rows.shape[0], dtype=np.int64)
        self.active = rows.shape[0]

    # --- what a forward step uses ------------------------------------------------------------

    def check_room(self, start: int, count: int, seq: int) -> None:
        """Raise CacheFullError unless rows [start, start + count) can take ``seq`` more positions."""
        need = int(self._lengths[start : start + count].max(initial=0)) + seq
        if need > self.capacity:
            raise CacheFullError(f"the sequence needs {need} positions but the cache holds {self.capacity}")

    def advance(self, start: int, ids: np.ndarray) -> None:
        """Record that rows [start, start + len(ids)) now also hold ``ids`` int64 [count, seq]."""
        count, seq = ids.shape
        rows = slice(start, start + count)
        if count == 1:
            n = int(self._lengths[start])
            self._tokens[start, n : n + seq] = ids[0]
        else:
            at = self._lengths[rows][:, None] + np.arange(seq)
            np.put_along_axis(self._tokens[rows], at, ids, axis=1)
        self._lengths[rows] += seq

    def bind(self, binding, start: int = 0, count: int | None = None) -> None:
        """Bind every buffer as both past input and present output of ``binding``, for the rows
        [start, start + count) (default: the decode batch)."""
        count = self.active if count is None else count
        shape = [count, *self._shape[1:]]
        offset = start * int(np.prod(self._shape[1:])) * self._dtype.itemsize
        for (past, present), value in zip(self.names, self._values):
            ptr = value.data_ptr() + offset
            binding.bind_input(past, self._device, 0, self._dtype, shape, ptr)
            binding.bind_output(present, self._device, 0, self._dtype, shape, ptr)

    # --- moving rows -------------------------------------------------------------------------

    def _swap(self, a: int, b: int) -> None:
        if a == b:
            return
        n = int(max(self._lengths[a], self._lengths[b]))
        self._move_positions([a, b], [b, a], n)
        self._tokens[[a, b], :n] = self._tokens[[b, a], :n]
        self._lengths[[a, b]] = self._lengths[[b, a]]
        self._released[[a, b]] = self._released[[b, a]]
        self._owners[a], self._owners[b] = self._owners[b], self._owners[a]
        for r in (a, b):
            if self._owners[r] is not None:
                self._row[self._owners[r]] = r

    def _move_positions(self, src: list[int], dst: list[int], n: int) -> None:
        """Buffers' rows ``dst`` take the first ``n`` positions of rows ``src`` (read before written)."""
        if n == 0:
            return
        if self._device == "cpu":
            for full in self._arrays:
                full[dst, :, :n] = full[src, :, :n]
            return
        arrays = self._host_arrays()
        for full in arrays:
            full[dst, :, :n] = full[src, :, :n]
        self._set(arrays)

    def _host_arrays(self) -> list[np.ndarray]:
        return self._arrays if self._device == "cpu" else [value.numpy() for value in self._values]

    def _set(self, arrays: list[np.ndarray]) -> None:
        from .session import import_onnxruntime

        ort = import_onnxruntime()
        self._shape = arrays[0].shape
        if self._device == "cpu":
            self._arrays = arrays  # the OrtValues below share this memory: keep it alive
            self._values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        else:
            self._arrays = []
            self._values = [ort.OrtValue.ortvalue_from_numpy(a, self._device, 0) for a in arrays]
        self.version += 1
