"""The adapters a model directory holds, loaded once and shared by every row that uses them.

Each LoRA input of the graph (``adapter_manifest.py``) gets one array of every adapter's matrices
stacked by slot: slot 0 is zeros (no adapter), slot k the k-th adapter of the manifest; ranks are
padded with zeros to the largest, and B is multiplied by its adapter's scale here, once. The arrays
are bound to each IO binding of the model; a row picks its adapter through its slot in the
``index`` input, so rows with different adapters (and rows with none) share one step.
"""

from __future__ import annotations

import hashlib
import zipfile

import numpy as np

from .adapter_manifest import AdapterEntry, Lora
from .config import ConfigError
from .model_dir import ManifestError
from .paths import check_file


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class AdapterBank:
    """``AdapterBank(model_dir, lora, dtype)``: the stacked matrices of ``lora``'s adapters in the
    graph's float type ``dtype``."""

    def __init__(self, model_dir: str, lora: Lora, dtype: str):
        from .session import import_onnxruntime

        self.index_input = lora.index
        self.names = tuple(a.name for a in lora.adapters)
        matrices = [_read(model_dir, entry, lora) for entry in lora.adapters]
        self.arrays: dict[str, np.ndarray] = {}
        held = list(zip(lora.adapters, matrices))
        for p in lora.inputs:
            rank = max((m[f"{p.projection}.a"].shape[1] for _, m in held if f"{p.projection}.a" in m), default=1)
            a = np.zeros((len(held) + 1, p.in_features, rank), dtype)
            b = np.zeros((len(held) + 1, rank, p.out_features), dtype)
            for slot, (entry, m) in enumerate(held, start=1):
                if f"{p.projection}.a" in m:
                    r = m[f"{p.projection}.a"].shape[1]
                    a[slot, :, :r] = m[f"{p.projection}.a"]
                    b[slot, :r] = m[f"{p.projection}.b"] * np.float32(entry.scale)
            self.arrays[p.a], self.arrays[p.b] = a, b
        ort = import_onnxruntime()
        self._values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in self.arrays.items()}

    def slot(self, name: str | None) -> int:
        """The slot of adapter ``name`` (None: 0, the base model); ConfigError for a name not held."""
        if name is None:
            return 0
        if name not in self.names:
            raise ConfigError("adapter", f"{name!r} is not an adapter of this model; it has {', '.join(self.names) or 'none'}")
        return self.names.index(name) + 1

    def bind(self, binding) -> None:
        """Bind every stacked matrix as its graph input of ``binding`` (once per binding)."""
        for name, value in self._values.items():
            binding.bind_ortvalue_input(name, value)


def no_adapter_slot(name: str | None) -> int:
    """The slot of ``name`` in a model directory that holds no adapters: 0 for None, else ConfigError."""
    if name is None:
        return 0
    raise ConfigError("adapter", f"{name!r} is not an adapter of this model; it has none (add one with `lmrt adapter`)")


def _read(model_dir: str, entry: AdapterEntry, lora: Lora) -> dict[str, np.ndarray]:
    """Adapter ``entry``'s matrices, once its file is known to be the one the manifest lists (its
    checksum) and every matrix to fit its projection; ManifestError in one line otherwise."""
    path = check_file(model_dir, entry.file, f"adapter {entry.name!r}")
    if file_sha256(path) != entry.sha256:
        raise ManifestError(f"{path} does not match its checksum in the manifest: the adapter {entry.name!r} is damaged; add it again")
    try:
        with np.load(path, allow_pickle=False) as npz:
            matrices = {key: np.asarray(npz[key], np.float32) for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ManifestError(f"cannot read adapter {entry.name!r} from {path} ({e})") from None
    sizes = {p.projection: (p.in_features, p.out_features) for p in lora.inputs}
    projections = {key.rpartition(".")[0] for key in matrices}
    for projection in projections:
        a, b = matrices.get(f"{projection}.a"), matrices.get(f"{projection}.b")
        fits = projection in sizes and a is not None and b is not None and a.ndim == b.ndim == 2
        if not (fits and a.shape[0] == sizes[projection][0] and b.shape[1] == sizes[projection][1] and a.shape[1] == b.shape[0]):
            raise ManifestError(f"adapter {entry.name!r}: its {projection} matrices do not fit this graph; add it again")
    if len(matrices) != 2 * len(projections):
        raise ManifestError(f"adapter {entry.name!r} holds arrays that are not its projections' a and b matrices")
    return matrices
