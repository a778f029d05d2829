"""Block-wise weight quantization in numpy, in the layout of onnxruntime's MatMulNBits.

A weight W [N, K] (N outputs, K inputs) is cut along K into blocks of ``block_size``; each block has
a scale and a zero point, and holds codes in 0 .. 2**bits - 1:

    W[n, b * block_size + i] ≈ (codes[n, b, i] - zero_point[n, b]) * scale[n, b]

Zero points are ``None`` (the midpoint 2**(bits - 1): symmetric), integers (uint8) or floats
(what a GGUF Q4_1 block needs; onnxruntime's CPU kernel takes float zero points for 4 bits only).
Float zero points may be float64, so that codes and zero points shifted together stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class BlockQuantized:
    bits: int
    block_size: int
    codes: np.ndarray  # uint8 [N, blocks, block_size], each in 0 .. 2**bits - 1
    scales: np.ndarray  # float32 [N, blocks]
    zero_points: np.ndarray | None  # None, uint8 or float32 / float64 [N, blocks]

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the weight it stands for."""
        n, blocks, size = self.codes.shape
        return n, blocks * size

    @property
    def zero_point_kind(self) -> str:
        if self.zero_points is None:
            return "none"
        return "float" if self.zero_points.dtype.kind == "f" else "uint8"

    def dequantize(self) -> np.ndarray:
        """float32 [N, K]"""
        zp = self.midpoint if self.zero_points is None else self.zero_points
        if self.zero_points is not None and self.zero_points.dtype != np.float64:
            zp = self.zero_points.astype(np.float32)
        w = (self.codes.astype(np.float32) - np.broadcast_to(zp, self.scales.shape)[..., None]) * self.scales[..., None]
        return w.reshape(self.shape).astype(np.float32, copy=False)

    @property
    def midpoint(self) -> float:
        return float(2 ** (self.bits - 1))

    def packed_codes(self) -> np.ndarray:
        """uint8 [N, blocks, block_size * bits / 8]: MatMulNBits' B, lower bits first."""
        if self.bits == 8:
            return np.ascontiguousarray(self.codes)
        if self.bits == 4:
            return np.ascontiguousarray(self.codes[..., 0::2] | (self.codes[..., 1::2] << 4))
        raise ValueError(f"{self.bits}-bit packing is not supported")

    def packed_zero_points(self) -> np.ndarray | None:
        """Zero points as MatMulNBits takes them: float [N * blocks]; uint8 [N * blocks] for 8 bits;
        for 4 bits two per byte, each row padded to whole bytes: uint8 [N * ceil(blocks / 2)]."""
        zp = self.zero_points
        if zp is None or zp.dtype.kind == "f" or self.bits == 8:
            return None if zp is None else np.ascontiguousarray(zp).reshape(-1)
        if zp.shape[1] % 2:
            zp = np.concatenate([zp, np.zeros((zp.shape[0], 1), np.uint8)], axis=1)
        return np.ascontiguousarray(zp[:, 0::2] | (zp[:, 1::2] << 4)).reshape(-1)


def _blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    """[N, K] -> [N, K / block_size, block_size] (K must be a multiple of the block size)."""
    n, k = w.shape
    if k % block_size:
        raise ValueError(f"K = {k} is not a multiple of the block size {block_size}")
    return w.astype(np.float32).reshape(n, k // block_size, block_size)


def quantize_symmetric(w: np.ndarray, bits: int, block_size: int) -> BlockQuantized:
    """Round to nearest with scale = max|w| / (2**(bits-1) - 1) and the midpoint as zero point,
    so the codes 1 .. 2**bits - 1 cover [-max|w|, max|w|] evenly around 0."""
    x = _blocks(w, block_size)  # [N, blocks, size]
    qmax = 2 ** (bits - 1) - 1
    absmax = np.abs(x).max(axis=-1)
    scales = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
    codes = np.clip(np.rint(x / scales[..., None]), -qmax, qmax) + 2 ** (bits - 1)
    return BlockQuantized(bits, block_size, codes.astype(np.uint8), scales, None)


def quantize_asymmetric(w: np.ndarray, bits: int, block_size: int) -> BlockQuantized:
    """Round to nearest on the grid from each block's minimum to its maximum (widened to include 0),
    with an integer zero point."""
    x = _blocks(w, block_size)  # [N, blocks, size]
    qmax = 2**bits - 1
    lo = np.minimum(x.min(axis=-1), 0.0)
    hi = np.maximum(x.max(axis=-1), 0.0)
    scales = np.where(hi > lo, (hi - lo) / qmax, 1.0).astype(np.float32)
    zero = np.clip(np.rint(-lo / scales), 0, qmax)
    codes = np.clip(np.rint(x / scales[..., None]) + zero[..., None], 0, qmax)
    return BlockQuantized(bits, block_size, codes.astype(np.uint8), scales, zero.astype(np.uint8))


def quantize_minmax(w: np.ndarray, bits: int, block_size: int) -> BlockQuantized:
    """Round to nearest on the grid from each block's minimum to its maximum, with a float zero point
    so the minimum is represented exactly (GGUF's Q4_1 scheme): W ≈ codes * scale + minimum."""
    x = _blocks(w, block_size)  # [N, blocks, size]
    qmax = 2**bits - 1
    lo, hi = x.min(axis=-1), x.max(axis=-1)
    scales = np.where(hi > lo, (hi - lo) / qmax, 1.0).astype(np.float32)
    codes = np.clip(np.rint((x - lo[..., None]) / scales[..., None]), 0, qmax)
    zero_points = (-lo / scales).astype(np.float32)
    return BlockQuantized(bits, block_size, codes.astype(np.uint8), scales, zero_points)
