"""The quantization schemes ``--int8`` and ``--int4``, each chosen by measuring perplexity on the
gate's text and decode speed (the candidates and their numbers: docs/benchmarks.md).

  int8  8-bit symmetric blocks of 32
  int4  4-bit blocks of 32 on each block's own min/max grid with a float minimum (GGUF's Q4_1
        layout): of the 4-bit candidates (symmetric, asymmetric with an integer zero point, blocks
        of 16 or 32), the one whose perplexity stays close to int8's

onnxruntime's CPU kernel is fast only at accuracy level 4 (int8 activations) and takes no float zero
points at speed, so a float minimum is applied as integer codes plus a per-block offset (see
``rewrite``).

The lm_head and the token embeddings stay at 8 bits in both schemes: they are one table when
tied, the logits are the most sensitive output, and 8 bits still quarter the table's size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from .blocks import BlockQuantized, quantize_asymmetric, quantize_minmax, quantize_symmetric

METHODS: dict[str, Callable[[np.ndarray, int, int], BlockQuantized]] = {
    "symmetric": quantize_symmetric,
    "asymmetric": quantize_asymmetric,
    "minmax": quantize_minmax,
}

# onnxruntime MatMulNBits accuracy levels. "int8": activations are quantized to int8 per block and
# multiplied with integer kernels (fast on CPU, at a small cost in perplexity). "float": the weights
# are dequantized and multiplied in fp32 (exact, slower on CPU).
COMPUTE = {"int8": 4, "float": 0}


@dataclass(frozen=True)
class Scheme:
    name: str
    bits: int  # the linear layers
    method: str  # a key of METHODS
    max_increase: float  # default quality gate: largest relative perplexity increase over fp32
    block_size: int = 32
    head_bits: int = 8  # lm_head and token embeddings
    head_method: str = "symmetric"
    compute: str = "int8"  # a key of COMPUTE: how MatMulNBits multiplies on the CPU

    def __post_init__(self):
        if self.method not in METHODS or self.head_method not in METHODS:
            raise ValueError(f"unknown quantization method in scheme {self.name!r}")
        if self.compute not in COMPUTE:
            raise ValueError(f"unknown compute {self.compute!r}; choose one of {', '.join(COMPUTE)}")

    def quantize(self, kind: str, w: np.ndarray) -> BlockQuantized | None:
        """Blocks for a weight ``w`` [N, K] of ``kind`` ("linear", "lm_head", "embedding"); None
        leaves it in float (K not a multiple of the block size)."""
        if w.shape[1] % self.block_size:
            return None
        if kind == "linear":
            return METHODS[self.method](w, self.bits, self.block_size)
        return METHODS[self.head_method](w, self.head_bits, self.block_size)

    @property
    def accuracy_level(self) -> int:
        return COMPUTE[self.compute]

    def describe(self) -> dict:
        return {**asdict(self), "accuracy_level": self.accuracy_level}


SCHEMES: dict[str, Scheme] = {
    "int8": Scheme("int8", bits=8, method="symmetric", max_increase=0.02),
    "int4": Scheme("int4", bits=4, method="minmax", max_increase=0.15),
}


def scheme_for(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown quantization {name!r}; choose one of {', '.join(SCHEMES)}") from None
