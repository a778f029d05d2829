"""Carry a GGUF file's own quantized blocks into the ONNX graph, with no second rounding.

GGUF Q4_0, Q4_1 and Q8_0 store blocks of 32 weights along a row (one row per output):
  Q4_0  f16 d, 16 bytes of nibbles      w = d * (q - 8)       q in 0..15
  Q4_1  f16 d, f16 m, 16 bytes          w = d * q + m         q in 0..15
  Q8_0  f16 d, 32 signed bytes          w = d * q             q in -128..127
Byte j of a 4-bit block holds element j in its low nibble and element j + 16 in its high one.

The exported graph fuses and reorders these rows (q/k/v in one matrix, rotary permutations), so rows
are matched by value: every row of a graph weight must equal, bit for bit, a dequantized GGUF row;
then that row's blocks are used as they are. A weight with any unmatched row is not taken from here.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..runtime.errors import first_line
from .blocks import BlockQuantized
from .errors import QuantizeError
from .gguf_file import gguf_problem

BLOCK = 32
BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}


def read_gguf(path: str):
    """A ``gguf.GGUFReader`` of ``path``, or QuantizeError naming the file: a file cut short or
    damaged fails here, not halfway through quantizing."""
    import struct

    from gguf import GGUFReader

    problem = gguf_problem(path)
    if problem:
        raise QuantizeError(problem)
    try:
        return GGUFReader(path)
    except (ValueError, struct.error, IndexError, KeyError, EOFError, OSError) as e:
        raise QuantizeError(f"cannot read the GGUF file {path}: it is truncated or damaged ({first_line(e)})") from None


def _f16(raw: np.ndarray) -> np.ndarray:
    """uint8 [..., 2] -> float32 [...]"""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def decode_blocks(kind: str, raw: np.ndarray) -> BlockQuantized:
    """Raw GGUF rows uint8 [rows, bytes per row] -> BlockQuantized [rows, K]."""
    rows = raw.shape[0]
    if kind == "Q8_0":
        b = raw.reshape(rows, -1, 34)
        d = _f16(b[..., 0:2])
        codes = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return BlockQuantized(8, BLOCK, codes, d, None)
    size = 18 if kind == "Q4_0" else 20
    b = raw.reshape(rows, -1, size)
    d = _f16(b[..., 0:2])
    nibbles = b[..., size - 16 :]
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).astype(np.uint8)  # [rows, blocks, 32]
    if kind == "Q4_0":
        return BlockQuantized(4, BLOCK, codes, d, None)
    m = _f16(b[..., 2:4])
    # w = d * q + m = d * (q - z) with z = -m / d; a block with d = 0 is m everywhere: codes 0, z = -1, scale m
    zero = d == 0
    scales = np.where(zero, m, d)
    codes[zero] = 0
    zero_points = np.where(zero, -1.0, -m / np.where(zero, 1.0, d)).astype(np.float32)
    return BlockQuantized(4, BLOCK, codes, scales.astype(np.float32), zero_points)


def _row_key(row: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(row, dtype=np.float32).tobytes(), digest_size=16).digest()


class GGUFBlocks:
    """Index of the Q4_0 / Q4_1 / Q8_0 rows of a GGUF file, by their dequantized values."""

    def __init__(self, path: str):
        from gguf.quants import dequantize

        self.path = path
        self._tensors: list[tuple[str, BlockQuantized]] = []
        self._rows: dict[bytes, tuple[int, int]] = {}
        for t in read_gguf(path).tensors:
            kind = t.tensor_type.name
            if kind not in BITS or len(t.data.shape) != 2:
                continue
            raw = np.asarray(t.data)
            blocks = decode_blocks(kind, raw)
            index = len(self._tensors)
            self._tensors.append((kind, blocks))
            for r, row in enumerate(dequantize(raw, t.tensor_type)):
                self._rows.setdefault(_row_key(row), (index, r))

    def __len__(self) -> int:
        return len(self._tensors)

    def find(self, w: np.ndarray, bits: int) -> tuple[BlockQuantized, str] | None:
        """The GGUF blocks of every row of ``w`` [N, K] if all rows are GGUF rows of ``bits`` bits:
        (blocks [N, K], GGUF type); else None."""
        hits = []
        for row in w:
            hit = self._rows.get(_row_key(row))
            if hit is None:
                return None
            hits.append(hit)
        kinds = {self._tensors[i][0] for i, _ in hits}
        if any(BITS[k] != bits for k in kinds):
            return None
        tensors = [self._tensors[i][1] for i, _ in hits]
        rows = [r for _, r in hits]
        codes = np.stack([q.codes[r] for q, r in zip(tensors, rows)])
        scales = np.stack([q.scales[r] for q, r in zip(tensors, rows)])
        zero_points = None
        if any(q.zero_points is not None for q in tensors):  # mixed Q4_0 / Q4_1: Q4_0's zero point is 8
            zero_points = np.stack(
                [np.full(q.scales.shape[1], q.midpoint, np.float32) if q.zero_points is None else q.zero_points[r]
                 for q, r in zip(tensors, rows)]
            )  # fmt: skip
        return BlockQuantized(bits, BLOCK, codes, scales, zero_points), "+".join(sorted(kinds))
