"""The scratch query row of a decoder graph's attention nodes (``GraphIO.scratch_positions``).

For a batch of one row, every attention node runs one query row more than the pass has new
positions: a copy of the last new one, at the position after it. Its output is dropped, and its key
and value land in the cache's spare position past the row's length. onnxruntime's CPU attention
multiplies probabilities by values with a one-row kernel when a pass has one query row and with the
packed kernel otherwise, and the two round differently; with the scratch row every pass of one row
takes the packed kernel, whose rows do not depend on each other, so a pass checking k positions
gives exactly the logits of k one-position steps (int8 compute included). A batch of several rows
runs without it: there onnxruntime takes a single new position per row over a cache.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto

if TYPE_CHECKING:
    from .graph import GraphBuilder, RotaryTable


class ScratchRow:
    """The shared tensors of the scratch row, and the nodes that add it to an attention node's
    inputs and drop it from its output."""

    def __init__(self, b: "GraphBuilder", input_ids: str):
        self.b = b
        # [1] int64: query rows after the new ones at every attention (1 for a batch of one row, else 0)
        self.rows = b.op("Cast", b.op("Equal", b.op("Shape", input_ids, start=0, end=1), b.const([1])), to=TensorProto.INT64)
        self.new_positions = b.op("Shape", input_ids, start=1, end=2)  # [1]
        # [seq + rows]: 0 .. seq - 1, then seq - 1 again for the scratch row (one Gather per input, not a Concat and slices)
        query_rows = b.op("Squeeze", b.op("Add", self.new_positions, self.rows))
        last = b.op("Squeeze", b.op("Sub", self.new_positions, b.const([1])))
        self.order = b.op("Min", b.op("Range", b.const(0), query_rows, b.const(1)), last)

    def lengths(self, lengths: str, total: str) -> tuple[str, str]:
        """Each row's cached + new positions [batch] and the longest row's [], counting the scratch row."""
        b = self.b
        return b.op("Add", lengths, self.rows), b.op("Add", total, b.op("Squeeze", self.rows))

    @staticmethod
    def grown(table: "RotaryTable") -> "RotaryTable":
        """``table`` with its last row repeated: the scratch row's position may be the context length itself."""
        grow = lambda pair: tuple(np.concatenate([t, t[-1:]]) for t in pair)  # noqa: E731
        return dataclasses.replace(table, short=grow(table.short), long=table.long and grow(table.long))

    def added(self, x: str) -> str:
        """x [batch, seq, width] followed by a copy of its last position when the batch has one row."""
        return self.b.op("Gather", x, self.order, axis=1)

    def dropped(self, rows: str, out: str) -> None:
        """``out``: the attention output ``rows`` without the scratch row's output."""
        self.b.op("Slice", rows, self.b.const([0]), self.new_positions, self.b.const([1]), out=out)
