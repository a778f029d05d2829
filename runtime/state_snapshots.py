"""Snapshots of rows' fixed state: how a recurrent row goes back to an earlier position.

A fixed tensor (a recurrent layer's h or c) holds a row's state after its last position only, so going
back needs a copy taken earlier. For each row this keeps up to ``PER_ROW`` copies of every fixed
tensor, each tagged with the length it was taken at (0 marks an empty slot: the state at length 0 is
the initial one, zeros). The store takes one before every step of several tokens over a row (a prompt
chunk, a speculative check), at the row's length then; when a row's slots are all taken, the copy
whose loss leaves the smallest gap between its neighbours goes, so a row's snapshots stay spread over
its length however long it grows. ``restore`` puts back the latest copy at or before a length and
forgets those after it. The memory is allocated with the rows: ``PER_ROW`` copies of a row's fixed
tensors per row, and nothing else.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .state_spec import StateSpec

PER_ROW = 8  # snapshots kept per row


def fixed_bytes(tensors: Sequence[StateSpec]) -> int:
    """Bytes one row's fixed tensors take (one copy of its state)."""
    return sum(int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize for t in tensors if t.kind == "fixed")


class Snapshots:
    """The copies of the fixed tensors among ``tensors`` for ``rows`` rows, and their lengths."""

    def __init__(self, tensors: Sequence[StateSpec], rows: int = 1):
        self._specs = [t for t in tensors if t.kind == "fixed"]
        self.allocate(rows)

    def allocate(self, rows: int) -> None:
        """``rows`` rows holding no snapshots."""
        self.lengths = np.zeros((rows, PER_ROW), dtype=np.int64)  # 0: an empty slot
        self.copies = [np.zeros((rows, PER_ROW, *t.shape), t.dtype) for t in self._specs]

    def regrown(self, rows: int, keep: list[int]) -> None:
        """``rows`` rows whose first ones hold the snapshots of rows ``keep``, in that order."""
        lengths, copies = self.lengths[keep], [c[keep] for c in self.copies]
        self.allocate(rows)
        self.lengths[: len(keep)] = lengths
        for new, kept in zip(self.copies, copies):
            new[: len(keep)] = kept

    def move(self, src: list[int], dst: list[int]) -> None:
        """Rows ``dst`` take the snapshots of rows ``src`` (all read before any is written)."""
        self.lengths[dst] = self.lengths[src]
        for c in self.copies:
            c[dst] = c[src]

    def take(self, row: int, length: int, arrays: Sequence[np.ndarray]) -> None:
        """Keep a copy of row ``row``'s fixed tensors (``arrays``, the buffers of the fixed tensors in
        order), which hold its state at ``length`` positions."""
        held = self.lengths[row]
        if length <= 0 or (held == length).any():
            return
        empty = np.flatnonzero(held == 0)
        slot = int(empty[0]) if empty.size else self._least_missed(held, length)
        held[slot] = length
        for copy, full in zip(self.copies, arrays):
            copy[row, slot] = full[row]

    @staticmethod
    def _least_missed(held: np.ndarray, newest: int) -> int:
        """The slot whose snapshot leaves the smallest gap when dropped (the newest one comes after all)."""
        order = np.argsort(held)
        points = np.concatenate([[0], held[order], [newest]])
        gaps = points[2:] - points[:-2]  # the gap each snapshot's neighbours would leave
        return int(order[int(np.argmin(gaps))])

    def restore(self, row: int, length: int, arrays: Sequence[np.ndarray]) -> int:
        """Put row ``row``'s latest snapshot at or before ``length`` back into ``arrays`` (none: the
        initial zeros), forget those taken after ``length``, and return the length it holds."""
        held = self.lengths[row]
        held[held > length] = 0
        slot = int(np.argmax(held))
        for copy, full in zip(self.copies, arrays):
            full[row] = copy[row, slot] if held[slot] else 0
        return int(held[slot])

    def restorable(self, row: int, length: int) -> int:
        """The longest length at or before ``length`` row ``row`` has a snapshot of (0: none)."""
        held = self.lengths[row]
        return int(held[held <= length].max(initial=0))
