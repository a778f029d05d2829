"""The state store: every row of a model's decoding state (a KV cache, or fixed recurrent state), and
who owns which.

Each row remembers the token ids whose state it holds (``tokens``), how many (``lengths``) and the slot
of the LoRA adapter they ran with (``adapter_slots``; 0: none); the memory itself is in
``state_buffers.StateBuffers``. A row of fixed state goes back by restoring a snapshot
(``state_snapshots.py``; ``snapshot`` takes them before each step of several tokens): ``truncate``
puts back the latest one at or before the new length, and the tokens from there on are the row's
pending tokens (counted in ``lengths``), which the model runs first at the row's next step. Rows
[0, active) are the decode batch: one step advances all of them together, each at its own length.
The others are claimed by a sequence still being prefilled (fed through a one-row view), lent out
as a block (beam search, scoring), or free. A free row keeps what it holds, so a new sequence that
starts with the same tokens (and adapter) reuses them: the prefix-reuse policy lives here alone
(``claim`` picks the free row sharing the longest prefix; ``reserve`` keeps such rows when it grows
the store). ``activate`` and ``release`` move a row into and out of the decode batch by swapping it
with the batch's edge, so the batch stays contiguous. Rows are looked up by their owner (any
object), since swaps move them. Each store has its own IO binding of its decode batch and logits
buffer, so two drivers over one loaded model (a Generator and an Engine) never share a buffer.
"""

from __future__ import annotations

from typing import Any, Hashable, Iterable, Sequence

import numpy as np

from .manifest import Architecture, GraphIO
from .state_buffers import CacheFullError, StateBuffers, regrown_array as _regrown
from .state_spec import StateSpec


class StateStore:
    """``state``: every tensor of a row's state (``state_spec.state_of``); None: the KV cache of ``arch``."""

    def __init__(self, arch: Architecture, io: GraphIO, device: str = "cpu", state: Sequence[StateSpec] | None = None):
        self.buffers = StateBuffers(arch, io, device, state)
        self._switch = arch.rotary_switch_after  # LongRoPE: a row past it holds keys rotated with the long table
        self._tick = 0  # release order of free rows: the least recently used is reused first
        self.reset(1, 1, active=0)

    # --- shape ---------------------------------------------------------------------------------

    def reset(self, rows: int, capacity: int, active: int | None = None) -> None:
        """``rows`` empty rows of up to ``capacity`` positions each, none owned; the first ``active``
        of them (default: all) form the decode batch."""
        self.buffers.reset(rows, capacity)
        self._lengths = np.zeros(rows, dtype=np.int64)
        self._computed = np.zeros(rows, dtype=np.int64)  # positions the state holds; the rest are pending
        self._tokens = np.zeros((rows, capacity), dtype=np.int64)
        self._owners: list[Hashable | None] = [None] * rows
        self._row: dict[Hashable, int] = {}
        self._released, self._adapters = np.zeros(rows, dtype=np.int64), np.zeros(rows, dtype=np.int64)
        self.active = rows if active is None else active

    def resize(self, rows: int, capacity: int, keep: Iterable[int]) -> None:
        """Rows x capacity, holding the rows ``keep`` (every owned row among them) at the front, in
        that order; the other rows start empty. Owned rows keep their owners, and the decode batch
        its order."""
        keep = list(keep)
        owned = [r for r in range(self.rows) if self._owners[r] is not None]
        if not set(owned) <= set(keep) or len(keep) > rows:
            raise ValueError("resize must keep every owned row and fit them")
        if keep[: self.active] != list(range(self.active)):
            raise ValueError("resize must keep the decode batch first, in order")
        used = int(self._lengths[keep].max(initial=0))
        if used > capacity:
            raise CacheFullError(f"a row holds {used} positions, more than the new capacity {capacity}")
        self.buffers.regrown(rows, capacity, keep, used)
        self._tokens = _regrown(self._tokens[keep, :used], (rows, capacity))
        per_row = (self._lengths, self._computed, self._released, self._adapters)
        self._lengths, self._computed, self._released, self._adapters = (_regrown(a[keep], (rows,)) for a in per_row)
        self._owners = [self._owners[r] for r in keep] + [None] * (rows - len(keep))
        self._row = {o: r for r, o in enumerate(self._owners) if o is not None}

    def reserve(self, rows: int, capacity: int, prompts: Sequence[np.ndarray] = ()) -> None:
        """Make room for ``rows`` more rows of ``capacity`` positions beside those owned. Rows in use
        stay; so do the free rows that share a prefix with one of ``prompts`` (a chat's next turn
        reuses its history), the longest shared first."""
        if self.free_rows() >= rows and self.capacity >= capacity:
            return
        owned = self.owned_rows()
        if owned:
            capacity = max(capacity, self.capacity)
        free = [r for r in range(self.active, self.rows) if self._owners[r] is None and self._lengths[r] <= capacity]
        shared = {r: max((self.reusable_prefix(r, p) for p in prompts), default=0) for r in free}
        reuse = sorted((r for r in free if shared[r] > 0), key=lambda r: -shared[r])[:rows]
        self.resize(len(owned) + rows, capacity, owned + reuse)

    def adapter_slots(self, start: int, count: int) -> np.ndarray:
        """int64 [count]: the adapter slot of rows [start, start + count) (a copy)."""
        return self._adapters[start : start + count].copy()

    @property
    def rows(self) -> int:
        return int(self._lengths.shape[0])

    @property
    def capacity(self) -> int:
        return int(self.buffers.capacity)

    @property
    def lengths(self) -> np.ndarray:
        """int64 [rows]: positions each row holds (read-only)."""
        view = self._lengths.view()
        view.flags.writeable = False
        return view

    def tokens(self, row: int) -> np.ndarray:
        """int64 [length]: the token ids whose state row ``row`` holds (read-only)."""
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

    def claim(self, owner: Hashable, ids: np.ndarray | None = None, adapter: int = 0) -> int:
        """Give ``owner`` a free row outside the decode batch, to run with adapter slot ``adapter``, and
        return how many leading tokens of ``ids`` it already holds (at most all but the last, so a
        prefill has a token to compute logits from; only a row of the same adapter shares any).
        Without ``ids`` or a shared prefix, the least recently used row."""
        free = [r for r in range(self.active, self.rows) if self._owners[r] is None]
        if not free:
            raise CacheFullError("no free cache row")
        best, shared = free[int(np.argmin(self._released[free]))], 0
        if ids is not None and len(ids) > 1:
            for r in free:
                n = self.reusable_prefix(r, ids) if self._adapters[r] == adapter else 0
                if n > shared or (n == shared and n > 0 and self._released[r] < self._released[best]):
                    best, shared = r, n
        self._owners[best], self._row[owner], self._adapters[best] = owner, best, adapter
        self.truncate(best, shared)
        return shared

    def shared_prefix(self, row: int, ids: np.ndarray) -> int:
        """How many leading tokens of ``ids`` row ``row`` holds."""
        n = min(int(self._lengths[row]), len(ids))
        differ = np.flatnonzero(self._tokens[row, :n] != ids[:n])
        return int(differ[0]) if differ.size else n

    def reusable_prefix(self, row: int, ids: np.ndarray) -> int:
        """Leading tokens of ``ids`` a sequence claiming row ``row`` need not run again: the shared
        prefix, but for the last token; a fixed state's: the longest of it the row's state or one of
        its snapshots holds (no pending tokens to run again). None past a LongRoPE switch the new
        sequence would still have to reach: the row's keys there were rotated with the long table."""
        n = max(0, min(self.shared_prefix(row, ids), len(ids) - 1))
        if 0 < n <= self._switch < self._computed[row]:  # long-rotated keys for a row that starts short
            return 0
        if self.buffers.fixed and n < self._computed[row]:
            return self.buffers.snapshots.restorable(row, n)
        return min(n, int(self._computed[row]))

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
        """Forget row ``row``'s positions from ``length`` on (they stay in memory, unused). A fixed
        state goes back to its latest snapshot at or before ``length``; the tokens from there to
        ``length`` become pending."""
        if not 0 <= length <= self._lengths[row]:
            raise ValueError(f"cannot truncate a row of {self._lengths[row]} positions to {length}")
        if not self.buffers.fixed:
            self._computed[row] = length
        elif length < self._computed[row]:
            self._computed[row] = self.buffers.restore(row, length)
        self._lengths[row] = length

    def pending_rows(self, start: int, count: int) -> list[int]:
        """Rows among [start, start + count) with pending tokens (gone back to a snapshot before them)."""
        return [r for r in range(start, start + count) if self._computed[r] < self._lengths[r]]

    def take_pending(self, row: int) -> np.ndarray:
        """int64 [n]: row ``row``'s pending tokens, which leave the row until a step runs them (a copy)."""
        pending = self._tokens[row, self._computed[row] : self._lengths[row]].copy()
        self._lengths[row] = self._computed[row]
        return pending

    def snapshot(self, start: int, count: int) -> None:
        """Before a step of several tokens over rows [start, start + count): keep a copy of their
        fixed state (no pending tokens) at the lengths they hold."""
        if self.buffers.fixed:
            for row in range(start, start + count):
                self.buffers.snapshot(row, int(self._computed[row]))

    def copy_row(self, src: int, dst: int) -> None:
        """Make row ``dst`` hold what row ``src`` holds (several samples continuing one prompt)."""
        n = int(self._lengths[src])
        self.buffers.move([src], [dst], n)
        self._tokens[dst, :n] = self._tokens[src, :n]
        self._lengths[dst], self._computed[dst], self._adapters[dst] = n, self._computed[src], self._adapters[src]

    # --- blocks lent out (beam search, scoring) ----------------------------------------------

    def borrow(self, owner: Hashable, count: int, capacity: int, adapter: int = 0) -> int:
        """Append ``count`` empty rows of at least ``capacity`` positions, running with adapter slot
        ``adapter``, after every row there is, owned by ``owner`` until ``give_back``; returns the
        first one. The rows already there keep their places and contents."""
        if self.owns(owner):
            raise ValueError("that owner already holds rows")
        start = self.rows
        self.resize(start + count, max(capacity, self.capacity), range(start))
        self._owners[start:] = [(owner, i) for i in range(count)]
        self._adapters[start:] = adapter
        self._row.update({(owner, i): start + i for i in range(count)})
        self._row[owner] = start
        return start

    def give_back(self, owner: Hashable, rows: int, capacity: int) -> None:
        """End the loan of ``owner``'s block: the store returns to ``rows`` x ``capacity`` (what it was
        before ``borrow``), keeping every other row."""
        start = self._row.pop(owner)
        count = self.rows - start
        for i in range(count):
            self._row.pop((owner, i), None)
            self._owners[start + i] = None
        self.resize(rows, capacity, range(start))

    def reorder(self, start: int, sources: Sequence[int]) -> None:
        """Rows [start, start + len(sources)) of a borrowed block take what the block's rows
        ``start + sources[i]`` hold (repeats allowed): beam search keeps its best beams this way."""
        src = [start + int(s) for s in sources]
        dst = list(range(start, start + len(src)))
        used = int(self._lengths[src].max(initial=0))
        self.buffers.move(src, dst, used)
        self._tokens[dst, :used] = self._tokens[src, :used]
        self._lengths[dst], self._computed[dst], self._adapters[dst] = self._lengths[src], self._computed[src], self._adapters[src]

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
        self._computed[rows] = self._lengths[rows]
        self.buffers.commit(start, count)

    def binding(self, session, start: int, count: int, logits_name: str, logits_shape: tuple, logits_dtype, constants=None, constants_key=0):
        """An IO binding of rows [start, start + count) and its logits buffer (``StateBuffers.binding``)."""
        batch = start == 0 and count == self.active
        return self.buffers.binding(session, start, count, batch, logits_name, logits_shape, logits_dtype, constants, constants_key)

    # --- moving rows -------------------------------------------------------------------------

    def _swap(self, a: int, b: int) -> None:
        if a == b:
            return
        n = int(max(self._lengths[a], self._lengths[b]))
        self.buffers.move([a, b], [b, a], n)
        self._tokens[[a, b], :n] = self._tokens[[b, a], :n]
        for per_row in (self._lengths, self._computed, self._released, self._adapters):
            per_row[[a, b]] = per_row[[b, a]]
        self._owners[a], self._owners[b] = self._owners[b], self._owners[a]
        for r in (a, b):
            if self._owners[r] is not None:
                self._row[self._owners[r]] = r

