"""Which weight codes an int8 encoder runs: the directory's own, or 7-bit codes made from its 8-bit
ones in memory before the session is created, chosen per CPU when the Encoder loads.

An encoder's int8 projections (quantize/token_int8.py) keep, for a weight W [K, N], three
initializers: the codes ``NAME.int8`` (int8 [K, N], symmetric), the column scales ``NAME.scales``
(float [N]) and the scaled column sums ``NAME.scaled_column_sums`` (float [1, N], the codes' sums
times the scales, which take each token's zero point out of the product). A directory written with
8-bit codes (its quantization record says ``weight_code_bits: 8``) runs them as they are where
8-bit products are exact (runtime/cpu.py); elsewhere each code c becomes round(c / 2) (ties to
even), its column's scale doubles and the column sums are taken again from the new codes, so the
graph computes exactly what it says on every CPU. The quantizer picks the 8-bit codes (within
-126 .. 126, on half the 7-bit step) so that their halves are exactly the 7-bit codes it would
have written, and the 7-bit path gives what a 7-bit directory gives. Directories written before record no
``weight_code_bits``: their codes are 7-bit and run as they are.
"""

from __future__ import annotations

import os

import numpy as np

from .cpu import exact_8bit_int8_products
from .onnx_wire import StoredTensor, stored_initializers

CODES_SUFFIX, SCALES_SUFFIX, SUMS_SUFFIX = ".int8", ".scales", ".scaled_column_sums"
CODE_BITS_KEY = "weight_code_bits"  # in the manifest's quantization record
STORED_BEFORE = 7  # the codes of directories whose record has no CODE_BITS_KEY
INT8_CODES_ENV = "LMRT_INT8_CODES"
CHOICES = ("auto", "7", "8")
DEFAULT_CHOICE = "auto"
_NUMPY_TYPES = {1: np.float32, 3: np.int8}  # TensorProto.FLOAT, TensorProto.INT8


def stored_code_bits(manifest) -> int | None:
    """The bits of the weight codes an encoder directory stores: 7 or 8; None when its graph has no
    per-token int8 projections (float, or not an encoder)."""
    q = manifest.quantization
    if manifest.task not in ("embed", "classify") or q.get("name") != "int8":
        return None
    return int(q.get(CODE_BITS_KEY, STORED_BEFORE))


def requested_codes(int8_codes: str | None) -> str:
    """The choice in force: ``int8_codes`` if given, else the environment's LMRT_INT8_CODES, else
    "auto". ValueError for anything but "auto", "7" or "8"."""
    choice = int8_codes if int8_codes is not None else os.environ.get(INT8_CODES_ENV) or DEFAULT_CHOICE
    choice = str(choice).strip()
    if choice not in CHOICES:
        source = "int8_codes" if int8_codes is not None else INT8_CODES_ENV
        raise ValueError(f"{source} must be one of {', '.join(CHOICES)}; got {choice!r}")
    return choice


def code_bits_to_run(stored: int, choice: str, exact_8bit: bool | None = None) -> int:
    """The bits the session's codes have: 7 or 8. "auto" keeps 8-bit codes where their products are
    exact (``exact_8bit``, by default this CPU's); "7" and "8" force a path. ValueError for "8" on
    7-bit codes, which cannot be widened."""
    if choice == "auto":
        exact = exact_8bit_int8_products() if exact_8bit is None else exact_8bit
        return 8 if stored == 8 and exact else 7
    bits = int(choice)
    if bits > stored:
        raise ValueError(f"the directory stores {stored}-bit weight codes, which cannot run as {bits}-bit ones; "
                         "quantize the model again for 8-bit codes")
    return bits


def session_initializers(manifest, graph_path: str, int8_codes: str | None) -> tuple[int | None, dict]:
    """(the bits of the codes the session runs, or None for a graph without int8 projections;
    {initializer name: OrtValue} to hand to the session in place of the file's). The caller keeps
    the OrtValues for as long as the session lives: onnxruntime reads their buffers, not a copy."""
    choice = requested_codes(int8_codes)
    stored = stored_code_bits(manifest)
    if stored is None:
        return None, {}
    bits = code_bits_to_run(stored, choice)
    if bits == stored:
        return bits, {}
    from .session import import_onnxruntime

    ort = import_onnxruntime()
    arrays = seven_bit_initializers(graph_path)
    return bits, {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}


def seven_bit_initializers(graph_path: str) -> dict[str, np.ndarray]:
    """The codes, scales and scaled column sums of each int8 projection of ``graph_path``, made 7-bit
    from its 8-bit codes: {initializer name: array} to put in the session in place of the file's."""
    stored = {t.name: t for t in stored_initializers(graph_path)}
    base = os.path.dirname(graph_path)
    out: dict[str, np.ndarray] = {}
    for name in stored:
        prefix = name[: -len(CODES_SUFFIX)]
        if not name.endswith(CODES_SUFFIX) or prefix + SCALES_SUFFIX not in stored or prefix + SUMS_SUFFIX not in stored:
            continue
        codes = _read(stored[name], graph_path, base)  # [K, N]
        scales = _read(stored[prefix + SCALES_SUFFIX], graph_path, base)  # [N]
        halved = halve_codes(codes)
        doubled = (scales * 2).astype(np.float32)
        out[name] = halved
        out[prefix + SCALES_SUFFIX] = doubled
        sums = (halved.astype(np.float32).sum(axis=0) * doubled).astype(np.float32)
        out[prefix + SUMS_SUFFIX] = sums.reshape(stored[prefix + SUMS_SUFFIX].dims)
    return out


def halve_codes(codes: np.ndarray) -> np.ndarray:
    """int8 codes made 7-bit: round(code / 2), ties to even (the quantizer picks its 8-bit codes so
    that this gives its 7-bit ones)."""
    return np.rint(codes.astype(np.float32) / 2).astype(np.int8)


def _read(tensor: StoredTensor, graph_path: str, base: str) -> np.ndarray:
    """The tensor's array, read from the graph file or its external data file."""
    dtype = _NUMPY_TYPES.get(tensor.data_type)
    if dtype is None:
        raise ValueError(f"{graph_path}: tensor {tensor.name!r} has data type {tensor.data_type}, not an int8 projection's")
    count = int(np.prod(tensor.dims, dtype=np.int64))
    path = os.path.join(base, tensor.location) if tensor.location else graph_path
    array = np.fromfile(path, dtype=dtype, count=count, offset=tensor.offset)
    if array.size != count or (tensor.length is not None and tensor.length != count * array.itemsize):
        raise ValueError(f"{graph_path}: tensor {tensor.name!r} is cut short; quantize the model again")
    return array.reshape(tensor.dims)
