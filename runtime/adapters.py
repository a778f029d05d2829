"""The adapters a model holds, loaded once and shared by every row that uses them.

Each LoRA input of the graph (``adapter_manifest.py``) gets one array of every adapter's matrices
stacked by slot: slot 0 is zeros (no adapter), slot k the k-th adapter of the manifest; ranks are
padded with zeros to the largest, and B is multiplied by its adapter's scale here, once. The arrays
are bound to each IO binding of the model; a row picks its adapter through its slot in the
``index`` input, so rows with different adapters (and rows with none) share one step.

The set may change while serving (``add`` and ``remove``, from the engine's thread between two
steps): each change builds new stacks (the arrays a step has bound are never written to) and a new
``version``, at which every IO binding binds them again. A slot keeps its adapter while it is held;
a removed adapter's slot is taken again only by ``add`` once no row of the state stores is tagged
with it (``add``'s ``tagged``), so no row's cache is reused under another adapter.
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


class AdapterChangeError(ValueError):
    """An adapter cannot be added or removed now; ``reason`` says why: "held" (a name held
    already), "unknown" (a name not held), "in_use" (rows use it) or "full" (as many as allowed)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class AdapterBank:
    """``AdapterBank(model_dir, lora, dtype)``: the stacked matrices of ``lora``'s adapters in the
    graph's float type ``dtype``."""

    def __init__(self, model_dir: str, lora: Lora, dtype: str):
        self.index_input = lora.index
        self.model_dir, self.lora, self.dtype = model_dir, lora, dtype
        # per slot from 1: (name, {"{projection}.a"/".b": matrix}, scale), None for a freed slot
        self._held: list[tuple[str, dict[str, np.ndarray], float] | None] = [
            (entry.name, read_adapter(model_dir, entry, lora), entry.scale) for entry in lora.adapters
        ]
        self.version = 0
        self._stack()

    @property
    def names(self) -> tuple[str, ...]:
        """The adapters held, in slot order."""
        return tuple(h[0] for h in self._held if h is not None)

    def slot(self, name: str | None) -> int:
        """The slot of adapter ``name`` (None: 0, the base model); ConfigError for a name not held."""
        if name is None:
            return 0
        for slot, held in enumerate(self._held, start=1):
            if held is not None and held[0] == name:
                return slot
        raise ConfigError("adapter", f"{name!r} is not an adapter of this model; it has {', '.join(self.names) or 'none'}")

    def add(self, name: str, matrices: dict[str, np.ndarray], scale: float, tagged: set[int] = frozenset()) -> int:
        """Hold adapter ``name`` (its matrices as ``read_adapter`` gives them) and return its slot: a
        freed slot no row is ``tagged`` with, or a new one."""
        if name in self.names:
            raise AdapterChangeError(f"the adapter '{name}' is already loaded", "held")
        check_fits(name, matrices, self.lora)
        free = [s for s, held in enumerate(self._held, start=1) if held is None and s not in tagged]
        if free:
            self._held[free[0] - 1] = (name, matrices, scale)
        else:
            self._held.append((name, matrices, scale))
        self._stack()
        return self.slot(name)

    def remove(self, name: str) -> int:
        """Stop holding adapter ``name``; returns the slot it had."""
        if name not in self.names:
            raise AdapterChangeError(f"the adapter '{name}' is not loaded", "unknown")
        slot = self.slot(name)
        self._held[slot - 1] = None
        self._stack()
        return slot

    def bind(self, binding) -> None:
        """Bind every stacked matrix as its graph input of ``binding`` (once per binding and version)."""
        for name, value in self._values.items():
            binding.bind_ortvalue_input(name, value)

    def _stack(self) -> None:
        """New stacks of the held adapters' matrices (the ones bound so far stay as they are)."""
        from .session import import_onnxruntime

        held = [(slot, h) for slot, h in enumerate(self._held, start=1) if h is not None]
        arrays: dict[str, np.ndarray] = {}
        for p in self.lora.inputs:
            pa, pb = f"{p.projection}.a", f"{p.projection}.b"
            rank = max((m[pa].shape[1] for _, (_, m, _) in held if pa in m), default=1)
            a = np.zeros((len(self._held) + 1, p.in_features, rank), self.dtype)
            b = np.zeros((len(self._held) + 1, rank, p.out_features), self.dtype)
            for slot, (_, m, scale) in held:
                if pa in m:
                    r = m[pa].shape[1]
                    a[slot, :, :r] = m[pa]
                    b[slot, :r] = m[pb] * np.float32(scale)
            arrays[p.a], arrays[p.b] = a, b
        ort = import_onnxruntime()
        self.arrays = arrays
        self._values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
        self.version += 1


def no_adapter_slot(name: str | None) -> int:
    """The slot of ``name`` in a model directory that holds no adapters: 0 for None, else ConfigError."""
    if name is None:
        return 0
    raise ConfigError("adapter", f"{name!r} is not an adapter of this model; it has none (add one with `lmrt adapter`)")


def read_adapter(model_dir: str, entry: AdapterEntry, lora: Lora) -> dict[str, np.ndarray]:
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
    check_fits(entry.name, matrices, lora)
    return matrices


def check_fits(name: str, matrices: dict[str, np.ndarray], lora: Lora) -> None:
    """ManifestError unless ``matrices`` are pairs a [in, r], b [r, out] of projections of the graph."""
    sizes = {p.projection: (p.in_features, p.out_features) for p in lora.inputs}
    projections = {key.rpartition(".")[0] for key in matrices}
    for projection in projections:
        a, b = matrices.get(f"{projection}.a"), matrices.get(f"{projection}.b")
        fits = projection in sizes and a is not None and b is not None and a.ndim == b.ndim == 2
        if not (fits and a.shape[0] == sizes[projection][0] and b.shape[1] == sizes[projection][1] and a.shape[1] == b.shape[0]):
            raise ManifestError(f"adapter {name!r}: its {projection} matrices do not fit this graph; add it again")
    if len(matrices) != 2 * len(projections):
        raise ManifestError(f"adapter {name!r} holds arrays that are not its projections' a and b matrices")
