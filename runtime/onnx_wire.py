"""Where an ONNX file keeps its weights, read from the protobuf wire format without the onnx package.

A graph saved with external data names, for each such tensor, a file (``location``, relative to the
graph's directory), an ``offset`` and a ``length``. The runtime checks these before onnxruntime opens
anything, so a graph cannot make it read outside the model directory, and a missing or short data
file is reported by name. Only the fields on the way to a tensor are decoded (model → graph →
initializers, nodes' attributes, subgraphs, functions); everything else, weights included, is skipped
by its length, so a file of any size costs one pass over its field headers.

``stored_initializers`` reads the main graph's initializers the same way: each one's type, shape and
where its bytes are (in the graph file, or in an external data file), so the runtime can read the
few tensors it replaces (runtime/int8_codes.py) with numpy alone.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import Iterator


class OnnxFileError(ValueError):
    """The file is not a complete ONNX model (cut short, damaged, or something else)."""


@dataclass(frozen=True)
class ExternalData:
    tensor: str
    location: str
    offset: int
    length: int | None  # None: to the end of the file


# Field numbers from onnx.proto.
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODES, _GRAPH_INITIALIZERS, _GRAPH_SPARSE_INITIALIZERS = 1, 5, 15
_FUNCTION_NODES = 7
_NODE_ATTRIBUTES = 5
_ATTRIBUTE_TENSOR, _ATTRIBUTE_GRAPH, _ATTRIBUTE_TENSORS, _ATTRIBUTE_GRAPHS = 5, 6, 10, 11
_ATTRIBUTE_SPARSE_TENSOR, _ATTRIBUTE_SPARSE_TENSORS = 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_NAME, _TENSOR_RAW_DATA = 1, 2, 8, 9
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_MAX_DEPTH = 64  # subgraphs nested deeper than this are refused rather than followed


@dataclass(frozen=True)
class StoredTensor:
    """Where a graph initializer's bytes are: ``location`` is the file (relative to the graph's
    directory; "" for the graph file itself, whose raw_data field holds them), ``offset`` and
    ``length`` the bytes in it."""

    name: str
    data_type: int  # TensorProto.DataType: 1 float, 3 int8, ...
    dims: tuple[int, ...]
    location: str
    offset: int
    length: int | None  # None: to the end of the file


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise OnnxFileError("truncated or damaged (a number runs past the end)")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int | tuple[int, int]]]:
    """(field number, wire type, value or (start, end) of the bytes) for each field in buf[start:end]."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise OnnxFileError("damaged (field number 0)")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise OnnxFileError("truncated (a field runs past the end)")
            yield number, wire, (pos, pos + length)
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise OnnxFileError("truncated (a field runs past the end)")
        else:
            raise OnnxFileError(f"damaged (wire type {wire})")


def _messages(buf, start: int, end: int, wanted: int) -> Iterator[tuple[int, int]]:
    for number, wire, value in _fields(buf, start, end):
        if number == wanted and wire == 2:
            yield value


def _text(buf, span: tuple[int, int]) -> str:
    try:
        return bytes(buf[span[0] : span[1]]).decode("utf-8")
    except UnicodeDecodeError:
        raise OnnxFileError("damaged (a name is not UTF-8)") from None


def _tensor(buf, span: tuple[int, int], out: list[ExternalData], stored: list[StoredTensor] | None = None) -> None:
    name, location, entries, data_type, dims, raw = "", _EXTERNAL - 1, {}, 0, [], None
    for number, wire, value in _fields(buf, *span):
        if number == _TENSOR_DIMS and wire == 0:
            dims.append(value)
        elif number == _TENSOR_DIMS and wire == 2:  # packed
            pos = value[0]
            while pos < value[1]:
                dim, pos = _varint(buf, pos, value[1])
                dims.append(dim)
        elif number == _TENSOR_DATA_TYPE and wire == 0:
            data_type = value
        elif number == _TENSOR_RAW_DATA and wire == 2:
            raw = value
        elif number == _TENSOR_NAME and wire == 2:
            name = _text(buf, value)
        elif number == _TENSOR_DATA_LOCATION and wire == 0:
            location = value
        elif number == _TENSOR_EXTERNAL_DATA and wire == 2:
            key = val = ""
            for n, w, v in _fields(buf, *value):
                if n == _ENTRY_KEY and w == 2:
                    key = _text(buf, v)
                elif n == _ENTRY_VALUE and w == 2:
                    val = _text(buf, v)
            entries[key] = val
    if location != _EXTERNAL:
        if stored is not None and raw is not None:
            stored.append(StoredTensor(name, data_type, tuple(dims), "", raw[0], raw[1] - raw[0]))
        return
    try:
        offset = int(entries.get("offset") or 0)
        length = int(entries["length"]) if entries.get("length") else None
    except ValueError:
        raise OnnxFileError(f"damaged (tensor {name!r} has a malformed offset or length)") from None
    if "location" not in entries or offset < 0 or (length is not None and length < 0):
        raise OnnxFileError(f"damaged (tensor {name!r} keeps its data outside but says not where)")
    out.append(ExternalData(name, entries["location"], offset, length))
    if stored is not None:
        stored.append(StoredTensor(name, data_type, tuple(dims), entries["location"], offset, length))


def _sparse(buf, span, out) -> None:
    for number, wire, value in _fields(buf, *span):
        if number in (_SPARSE_VALUES, _SPARSE_INDICES) and wire == 2:
            _tensor(buf, value, out)


def _nodes(buf, span, wanted: int, out, depth: int) -> None:
    for node in _messages(buf, *span, wanted):
        for attribute in _messages(buf, *node, _NODE_ATTRIBUTES):
            for number, wire, value in _fields(buf, *attribute):
                if wire != 2:
                    continue
                if number in (_ATTRIBUTE_TENSOR, _ATTRIBUTE_TENSORS):
                    _tensor(buf, value, out)
                elif number in (_ATTRIBUTE_SPARSE_TENSOR, _ATTRIBUTE_SPARSE_TENSORS):
                    _sparse(buf, value, out)
                elif number in (_ATTRIBUTE_GRAPH, _ATTRIBUTE_GRAPHS):
                    _graph(buf, value, out, depth + 1)


def _graph(buf, span, out, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise OnnxFileError("damaged (subgraphs nested too deeply)")
    for number, wire, value in _fields(buf, *span):
        if wire != 2:
            continue
        if number == _GRAPH_INITIALIZERS:
            _tensor(buf, value, out)
        elif number == _GRAPH_SPARSE_INITIALIZERS:
            _sparse(buf, value, out)
    _nodes(buf, span, _GRAPH_NODES, out, depth)


def external_data(path: str) -> list[ExternalData]:
    """Every tensor of the ONNX model ``path`` whose data lives in another file. OnnxFileError when
    the file is empty, cut short or not an ONNX model."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise OnnxFileError("empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            out: list[ExternalData] = []
            graphs = 0
            for number, wire, value in _fields(buf, 0, len(buf)):
                if number == _MODEL_GRAPH and wire == 2:
                    graphs += 1
                    _graph(buf, value, out, 0)
                elif number == _MODEL_FUNCTIONS and wire == 2:
                    _nodes(buf, value, _FUNCTION_NODES, out, 0)
            if not graphs:
                raise OnnxFileError("not an ONNX model (it has no graph)")
            return out


def stored_initializers(path: str) -> list[StoredTensor]:
    """The initializers of the main graph of the ONNX model ``path`` kept as raw bytes (in the graph
    file or in an external data file), with their types and shapes; their data is not read."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise OnnxFileError("empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            stored: list[StoredTensor] = []
            for graph in _messages(buf, 0, len(buf), _MODEL_GRAPH):
                for tensor in _messages(buf, *graph, _GRAPH_INITIALIZERS):
                    _tensor(buf, tensor, [], stored)
            return stored
