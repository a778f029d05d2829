"""The files a model directory's manifest names (its fields marked ``FILE``) and the files its graph
keeps weights in lie inside the model directory: no absolute path, no ``..``, no link leading out.
``load_manifest`` checks them all before anything is opened."""

from __future__ import annotations

import os
from dataclasses import fields, is_dataclass
from typing import TYPE_CHECKING

from .model_dir import ManifestError
from .onnx_wire import OnnxFileError, external_data

if TYPE_CHECKING:
    from .manifest import Manifest

FILE = {"file": True}  # metadata of a field holding a path inside the model directory


def file_fields(manifest: Manifest) -> list[tuple[str, str]]:
    """(dotted field name, path) of every file the manifest names: its fields marked ``FILE``."""
    out = []

    def walk(obj, prefix: str) -> None:
        for f in fields(obj):
            value = getattr(obj, f.name)
            if f.metadata.get("file") and value is not None:
                out.append((f"{prefix}{f.name}", value))
            elif is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            elif isinstance(value, tuple):  # a list of sections (the adapters of a model directory)
                for i, item in enumerate(value):
                    if is_dataclass(item):
                        walk(item, f"{prefix}{f.name}[{i}].")

    walk(manifest, "")
    return out


def contained_path(model_dir: str, relative: str, what: str) -> str:
    """``model_dir/relative`` once it is known to stay inside ``model_dir`` (no absolute path, no
    ``..``, no link leading out); ``what`` names the path in errors ("graph.file in lmrt.json")."""
    refuse = f"{model_dir}: {what} is {{}}; lmrt reads files inside the model directory only"
    if not relative:
        raise ManifestError(f"{model_dir}: {what} is empty")
    if os.path.isabs(relative) or relative.startswith(("/", "\\")) or os.path.splitdrive(relative)[0]:
        raise ManifestError(refuse.format(f"an absolute path ({relative})"))
    if ".." in relative.replace("\\", "/").split("/"):
        raise ManifestError(refuse.format(f"{relative}, which leads out with '..'"))
    root = os.path.realpath(model_dir)
    path = os.path.join(model_dir, relative)
    real = os.path.realpath(path)
    if real == root:
        raise ManifestError(refuse.format(f"{relative}, the model directory itself"))
    if not real.startswith(root.rstrip(os.sep) + os.sep):
        raise ManifestError(refuse.format(f"{relative}, which resolves (through a link) to {real}"))
    return path


def check_file(model_dir: str, relative: str, what: str) -> str:
    """``contained_path``, once the file is known to be there and to be a file."""
    path = contained_path(model_dir, relative, what)
    if not os.path.exists(path):
        raise ManifestError(f"{model_dir} is incomplete: {relative} is missing ({what})")
    if not os.path.isfile(path):
        raise ManifestError(f"{model_dir} is damaged: {relative} is not a file ({what})")
    return path


def check_external_data(model_dir: str, graph_relative: str) -> None:
    """The graph's weight files: inside the model directory, present, and long enough."""
    graph_path = os.path.join(model_dir, graph_relative)
    try:
        refs = external_data(graph_path)
    except OnnxFileError as e:
        raise ManifestError(f"{graph_path} is {e}: not a complete ONNX graph; export the model again") from None
    except OSError as e:
        raise ManifestError(f"cannot read {graph_path} ({e.strerror})") from None
    needed: dict[str, tuple[int, str]] = {}  # location -> (bytes needed, a tensor stored there)
    for ref in refs:
        end = ref.offset + (ref.length or 0)
        needed[ref.location] = max(needed.get(ref.location, (0, ref.tensor)), (end, ref.tensor))
    base = os.path.dirname(graph_relative)
    for location, (end, tensor) in needed.items():
        what = f"the external data of tensor {tensor!r} in {graph_relative}"
        path = check_file(model_dir, os.path.join(base, location) if base else location, what)
        size = os.path.getsize(path)
        if size < end:
            raise ManifestError(
                f"{path} is truncated: {graph_relative} needs {end} bytes of it, it has {size}; export the model again"
            )
