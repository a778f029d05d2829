"""Whether a file is a complete GGUF file, from its header alone.

A GGUF file is a header (magic, version, counts, metadata key/value pairs, tensor descriptions) and
then the tensors' data, aligned. Walking the header gives where the last tensor ends, so a file cut
short (an interrupted download or copy) is found in milliseconds, by name, instead of failing
halfway through loading with a reshape error.
"""

from __future__ import annotations

import mmap
import os
import struct

MAGIC = b"GGUF"
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY = 8, 9


class _Short(Exception):
    pass


class _Header:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _Short()
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def skip(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise _Short()
        self.pos += n

    def string(self) -> bytes:
        n = self.take("<Q")
        self.skip(n)
        return bytes(self.buf[self.pos - n : self.pos])

    def value(self, kind: int):
        if kind in _SCALAR:
            fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[_SCALAR[kind]]
            return self.take(fmt)
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            inner, count = self.take("<I"), self.take("<Q")
            if inner in _SCALAR:
                self.skip(_SCALAR[inner] * count)
            elif inner == _STRING:  # vocabularies: tens of thousands of strings, skipped in a tight loop
                buf, pos, end = self.buf, self.pos, len(self.buf)
                for _ in range(count):
                    if pos + 8 > end:
                        raise _Short()
                    pos += 8 + int.from_bytes(buf[pos : pos + 8], "little")
                self.skip(pos - self.pos)
            else:
                for _ in range(count):
                    self.value(inner)
            return None
        raise ValueError(f"unknown metadata type {kind}")


def gguf_problem(path: str) -> str | None:
    """Why ``path`` is not a complete GGUF file (missing, a directory, unreadable, not GGUF, cut
    short), or None."""
    if os.path.isdir(path):
        return f"{path} is a directory, not a GGUF file"
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < len(MAGIC):
                return f"{path} is not a GGUF file (it is {'empty' if not size else 'too short'})"
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                if buf[: len(MAGIC)] != MAGIC:
                    return f"{path} is not a GGUF file (no GGUF magic bytes)"
                return _truncation(path, buf, size)
    except FileNotFoundError:
        return f"GGUF file not found: {path}"
    except OSError as e:
        return f"cannot read {path} ({e.strerror})"


def _truncation(path: str, buf, size: int) -> str | None:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    h = _Header(buf)
    h.skip(len(MAGIC))
    try:
        version = h.take("<I")
        if version not in (2, 3):
            return None  # another layout (or byte order): leave it to the reader
        tensors, keys = h.take("<Q"), h.take("<Q")
        alignment = 32
        for _ in range(keys):
            key, kind = h.string(), h.take("<I")
            value = h.value(kind)
            if key == b"general.alignment" and isinstance(value, int) and value > 0:
                alignment = value
        end = 0
        for _ in range(tensors):
            h.string()
            dims = [h.take("<Q") for _ in range(h.take("<I"))]
            kind, offset = h.take("<I"), h.take("<Q")
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            count = 1
            for d in dims:
                count *= d
            end = max(end, offset + count // block * type_size)
    except _Short:
        return f"{path} is truncated: it ends inside its header ({size} bytes); download or copy it again"
    except (ValueError, KeyError):
        return f"{path} is damaged: its header does not describe GGUF tensors"
    data = -(-h.pos // alignment) * alignment
    if data + end > size:
        return f"{path} is truncated: its tensors need {data + end} bytes, the file has {size}; download or copy it again"
    return None
