"""Carry a GGUF file's own quantized blocks into the ONNX graph, with no second rounding.

Each GGUF type whose values MatMulNBits can hold exactly becomes blocks in one of its layouts:
  Q4_0  w = d (q - 8)           q 0..15   blocks of 32   4-bit codes
  Q4_1  w = d q + m             q 0..15   blocks of 32   4-bit codes, float zero point
  Q8_0  w = d q                 q -128..127  blocks of 32   8-bit codes
  Q5_0  w = d (q - 16)          q 0..31   blocks of 32   8-bit codes
  Q5_1  w = d q + m             q 0..31   blocks of 32   8-bit codes, float zero point
  Q4_K  w = d sc q - dmin mn    q 0..15   its 8 sub-blocks of 32: 4-bit codes, float zero point
  Q5_K  w = d sc q - dmin mn    q 0..31   its 8 sub-blocks of 32: 8-bit codes, float zero point
  Q6_K  w = d sc (q - 32)       q 0..63   its 16 sub-blocks of 16: 8-bit codes
(K-quants hold 256 weights per block, with 6-bit sub-block scales sc and minimums mn, or 8-bit
scales for Q6_K.) Other types (Q2_K, Q3_K, the IQ types, floats) are not kept.

The exported graph fuses and reorders a file's rows (q/k/v in one matrix, rotary permutations), so
rows are matched by value: every row of a graph weight must equal, bit for bit, a dequantized GGUF
row; then those rows' blocks are used as they are. Rows of different types in one weight (Q4_K_M
stores v in Q6_K beside q and k in Q4_K) share the layout that holds them all (8-bit blocks of 16).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..runtime.errors import first_line
from .blocks import BlockQuantized
from .errors import QuantizeError
from .gguf_file import gguf_problem

BLOCK_BYTES = {  # GGUF type -> (weights per block, bytes per block)
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q8_0": (32, 34),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}


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


def _nibbles(raw: np.ndarray) -> np.ndarray:
    """uint8 [..., n] -> [..., 2n]: the low nibbles of the n bytes, then the high ones."""
    return np.concatenate([raw & 0x0F, raw >> 4], axis=-1)


def _bits(raw: np.ndarray, count: int) -> np.ndarray:
    """uint8 [..., bytes] -> [..., count] of 0 / 1, least significant bit first."""
    return np.unpackbits(raw, axis=-1, count=count, bitorder="little")


def _symmetric(bits: int, codes: np.ndarray, scales: np.ndarray, zero: int) -> BlockQuantized:
    """w = scale (q - zero) with codes q: shifted so that ``zero`` sits on the layout's midpoint."""
    mid = 2 ** (bits - 1)
    shifted = (codes.astype(np.int16) + (mid - zero)).astype(np.uint8)
    return BlockQuantized(bits, codes.shape[-1], shifted, scales.astype(np.float32), None)


def _with_minimum(bits: int, code_bits: int, codes: np.ndarray, scales: np.ndarray, minimum: np.ndarray) -> BlockQuantized:
    """w = scale q - minimum = scale (q - minimum / scale) for ``code_bits``-bit codes q. A block with
    scale 0 is -minimum everywhere: codes 0, zero point -1, scale -minimum. Codes narrower than the
    layout are centred on its midpoint (both shifted alike), so that the graph's split into codes
    around the midpoint plus an offset adds no large terms that cancel."""
    flat = scales == 0
    shift = 2 ** (bits - 1) - 2 ** (code_bits - 1)
    codes = (np.where(flat[..., None], 0, codes) + shift).astype(np.uint8)
    zero_points = np.where(flat, -1.0, minimum.astype(np.float64) / np.where(flat, 1.0, scales)) + shift
    scales = np.where(flat, -minimum, scales).astype(np.float32)
    return BlockQuantized(bits, codes.shape[-1], codes, scales, zero_points.astype(np.float64))  # float64: exact after the shift


def _k_scales(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and minimums packed in a K-quant block's 12 bytes: [..., 8] each.
    Bytes 0-3 hold scales 0-3 and bytes 4-7 minimums 0-3 in their low 6 bits; sub-blocks 4-7 take
    their low 4 bits from bytes 8-11 and their high 2 bits from the top of bytes 0-7."""
    a, b, c = raw[..., 0:4], raw[..., 4:8], raw[..., 8:12]
    scales = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], axis=-1)
    minimums = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], axis=-1)
    return scales.astype(np.float32), minimums.astype(np.float32)


def _q4_0(b):
    return _symmetric(4, _nibbles(b[..., 2:18]), _f16(b[..., 0:2]), 8)


def _q4_1(b):
    return _with_minimum(4, 4, _nibbles(b[..., 4:20]), _f16(b[..., 0:2]), -_f16(b[..., 2:4]))


def _q8_0(b):
    return _symmetric(8, b[..., 2:34].view(np.int8), _f16(b[..., 0:2]), 0)


def _q5(b, low_at: int) -> np.ndarray:
    """Q5_0 / Q5_1 codes: 32 high bits at low_at - 4, nibbles from low_at."""
    return _nibbles(b[..., low_at : low_at + 16]) | (_bits(b[..., low_at - 4 : low_at], 32) << 4)


def _q5_0(b):
    return _symmetric(8, _q5(b, 6), _f16(b[..., 0:2]), 16)


def _q5_1(b):
    return _with_minimum(8, 5, _q5(b, 8), _f16(b[..., 0:2]), -_f16(b[..., 2:4]))


def _k_minimum(bits: int, code_bits: int, b, codes: np.ndarray) -> BlockQuantized:
    """Q4_K / Q5_K: codes [..., 8, 32] with the block's scales and minimums."""
    sc, mn = _k_scales(b[..., 4:16])
    return _with_minimum(bits, code_bits, codes, _f16(b[..., 0:2])[..., None] * sc, _f16(b[..., 2:4])[..., None] * mn)


def _q4_k(b):
    # 4 groups of 32 bytes, each holding sub-block 2g in its low nibbles and 2g + 1 in its high ones
    low = b[..., 16:144].reshape(*b.shape[:-1], 4, 1, 32)
    codes = np.concatenate([low & 0x0F, low >> 4], axis=-2).reshape(*b.shape[:-1], 8, 32)
    return _k_minimum(4, 4, b, codes)


def _q5_k(b):
    low = b[..., 48:176].reshape(*b.shape[:-1], 4, 1, 32)
    codes = np.concatenate([low & 0x0F, low >> 4], axis=-2).reshape(*b.shape[:-1], 8, 32)
    high = b[..., 16:48][..., None, :] >> np.arange(8, dtype=np.uint8)[:, None] & 1  # bit s of byte k: sub-block s
    return _k_minimum(8, 5, b, codes | (high << 4))


def _q6_k(b):
    # low 4 bits: 2 halves of 64 bytes, low nibbles then high ones; high 2 bits: 2 halves of 32
    # bytes holding 4 groups of 32 each; 16 sub-blocks of 16 with int8 scales
    lead = b.shape[:-1]
    low = b[..., 0:128].reshape(*lead, 2, 1, 64)
    low = np.concatenate([low & 0x0F, low >> 4], axis=-2).reshape(*lead, 8, 32)
    high = b[..., 128:192].reshape(*lead, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[:, None] & 3
    codes = (low | (high.reshape(*lead, 8, 32) << 4)).reshape(*lead, 16, 16)
    scales = _f16(b[..., 208:210])[..., None] * b[..., 192:208].view(np.int8).astype(np.float32)
    return _symmetric(8, codes, scales, 32)


DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0, "Q5_0": _q5_0, "Q5_1": _q5_1,
            "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}  # fmt: skip


def decode_blocks(kind: str, raw: np.ndarray) -> BlockQuantized:
    """Raw GGUF rows uint8 [rows, bytes per row] -> BlockQuantized [rows, K] in the layout above."""
    per_block, size = BLOCK_BYTES[kind]
    q = DECODERS[kind](raw.reshape(raw.shape[0], -1, size))  # codes [rows, blocks, (sub-blocks,) size]
    n = raw.shape[0]
    return BlockQuantized(
        q.bits, q.block_size, q.codes.reshape(n, -1, q.block_size), q.scales.reshape(n, -1),
        None if q.zero_points is None else q.zero_points.reshape(n, -1),
    )  # fmt: skip


def layout(q: BlockQuantized) -> str:
    return f"{q.bits}-bit blocks of {q.block_size}"


def relayout(q: BlockQuantized, bits: int, block_size: int) -> BlockQuantized:
    """The same values in a layout with at least as many bits and blocks as small or smaller."""
    codes, scales, zero_points = q.codes, q.scales, q.zero_points
    if bits != q.bits:  # codes and zero points move to the wider layout's midpoint together
        shift = int(2 ** (bits - 1) - q.midpoint)
        codes = (codes.astype(np.int16) + shift).astype(np.uint8)
        zero_points = None if zero_points is None else zero_points + np.asarray(shift, zero_points.dtype)
    split = q.block_size // block_size
    if split > 1:
        n, blocks, _ = codes.shape
        codes = codes.reshape(n, blocks * split, block_size)
        scales = np.repeat(scales, split, axis=1)
        zero_points = None if zero_points is None else np.repeat(zero_points, split, axis=1)
    return BlockQuantized(bits, block_size, codes, scales, zero_points)


def _row_key(row: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(row, dtype=np.float32).tobytes(), digest_size=16).digest()


@dataclass
class Match:
    """What a GGUF file holds for a weight: its blocks when they are kept, else why not."""

    blocks: BlockQuantized | None
    kinds: str  # the GGUF types of its rows, "Q4_K+Q6_K"; "" when some rows are not in the file
    reason: str = ""  # why the blocks are not kept

    @property
    def how(self) -> str:
        return f"{self.kinds} as {layout(self.blocks)}"


class GGUFBlocks:
    """Index of the rows of a GGUF file's matrices, by their dequantized values; blocks are decoded
    only for the rows a weight takes."""

    def __init__(self, path: str):
        from gguf.quants import dequantize

        self.path = path
        self._tensors: list[tuple[str, np.ndarray]] = []  # (GGUF type, raw rows: memory-mapped)
        self._rows: dict[bytes, tuple[int, int]] = {}
        for t in read_gguf(path).tensors:
            if len(t.data.shape) != 2:
                continue
            raw = np.asarray(t.data)
            try:
                values = dequantize(raw, t.tensor_type)
            except NotImplementedError:
                continue
            index = len(self._tensors)
            self._tensors.append((t.tensor_type.name, raw))
            for r, row in enumerate(values):
                self._rows.setdefault(_row_key(row), (index, r))

    def __len__(self) -> int:
        return sum(kind in DECODERS for kind, _ in self._tensors)

    def find(self, w: np.ndarray, bits: int) -> Match:
        """The GGUF blocks of every row of ``w`` [N, K], in a layout of at least ``bits`` bits, or
        why there are none."""
        hits = []
        for row in w:
            hit = self._rows.get(_row_key(row))
            if hit is None:
                return Match(None, "", "not all of its rows are in the file")
            hits.append(hit)
        kinds = sorted({self._tensors[i][0] for i, _ in hits})
        label = "+".join(kinds)
        unkept = [k for k in kinds if k not in DECODERS]
        if unkept:
            return Match(None, label, f"{'+'.join(unkept)} has no exact MatMulNBits layout")
        parts = {i: decode_blocks(self._tensors[i][0], self._tensors[i][1][sorted({r for j, r in hits if j == i})])
                 for i in {i for i, _ in hits}}  # fmt: skip
        layout_bits = max(q.bits for q in parts.values())
        if layout_bits < bits:
            return Match(None, label, f"{layout_bits}-bit blocks, fewer bits than the scheme's {bits}")
        block_size = min(q.block_size for q in parts.values())
        row_of = {i: {r: n for n, r in enumerate(sorted({r for j, r in hits if j == i}))} for i in parts}
        parts = {i: relayout(q, layout_bits, block_size) for i, q in parts.items()}
        if any(q.zero_points is not None for q in parts.values()):  # a common float zero point
            parts = {i: _float_zero_points(q) for i, q in parts.items()}
        take = [(parts[i], row_of[i][r]) for i, r in hits]
        codes = np.stack([q.codes[r] for q, r in take])
        scales = np.stack([q.scales[r] for q, r in take])
        zero_points = None if take[0][0].zero_points is None else np.stack([q.zero_points[r] for q, r in take])
        return Match(BlockQuantized(layout_bits, block_size, codes, scales, zero_points), label)


def _float_zero_points(q: BlockQuantized) -> BlockQuantized:
    if q.zero_points is not None:
        return BlockQuantized(q.bits, q.block_size, q.codes, q.scales, q.zero_points.astype(np.float64))
    return BlockQuantized(q.bits, q.block_size, q.codes, q.scales, np.full(q.scales.shape, q.midpoint, np.float64))
