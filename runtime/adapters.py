"""The adapters a model holds, loaded once and shared by every row that uses them.

A step's graph takes, for each adapted projection (``adapter_manifest.py``), the A matrices of the
adapters its rows use side by side ([in, width]; B multiplied by its adapter's scale, once, and one
above the other, [width, out]), and a row mask [batch, width] that keeps each row's own adapter's
columns (none for a row without one). ``for_rows`` gives them for the rows' slots: the matrices of
each set of adapters are put side by side once and kept (a few sets), so a step reads each adapter
once whatever number of rows use it, and a step with no adapter reads none (width 0). Slot 0 is no
adapter, slot k the k-th adapter held.

The set may change while serving (``add`` and ``remove``, from the engine's thread between two
steps): each change drops the kept sets (the arrays a step has bound are never written to), so the
next step builds and binds new ones. A slot keeps its adapter while
it is held; a removed adapter's slot is taken again only by ``add`` once no row of the state stores
is tagged with it (``add``'s ``tagged``), so no row's cache is reused under another adapter.
"""

from __future__ import annotations

import hashlib
import zipfile
from typing import Callable

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
    """``AdapterBank(model_dir, lora, dtype)``: the matrices of ``lora``'s adapters in the graph's
    float type ``dtype``."""

    KEPT_SETS = 8  # sets of adapters whose matrices are kept side by side

    def __init__(self, model_dir: str, lora: Lora, dtype: str):
        self.model_dir, self.lora, self.dtype = model_dir, lora, dtype
        # per slot from 1: (name, {"{projection}.a"/".b": matrix}, scale), None for a freed slot
        self._held: list[tuple[str, dict[str, np.ndarray], float] | None] = [
            (entry.name, read_adapter(model_dir, entry, lora), entry.scale) for entry in lora.adapters
        ]
        self._sets: dict[tuple[int, ...], tuple[dict, dict, int]] = {}  # slots used -> ``_side_by_side``
        self._serial = 0
        self._masks: dict[tuple, tuple[dict, int]] = {}  # (set's serial, rows' slots) -> ``_row_masks``

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
        self._changed()
        return self.slot(name)

    def remove(self, name: str) -> int:
        """Stop holding adapter ``name``; returns the slot it had."""
        if name not in self.names:
            raise AdapterChangeError(f"the adapter '{name}' is not loaded", "unknown")
        slot = self.slot(name)
        self._held[slot - 1] = None
        self._changed()
        return slot

    def for_rows(self, slots: np.ndarray) -> tuple[tuple, Callable]:
        """For rows running with adapter ``slots`` (int64 [batch]): a key that changes whenever what
        must be bound does (an IO binding keyed by it is bound again), and a function that binds the
        matrices of the rows' adapters and the rows' masks to an IO binding."""
        rows = tuple(slots.tolist())
        used = tuple(sorted(set(rows) - {0}))
        values, layouts, serial = self._kept(self._sets, used, lambda: self._side_by_side(used))
        masks, mask_serial = self._kept(self._masks, (serial, rows), lambda: self._row_masks(layouts, rows))

        def bind(binding) -> None:
            for name, value in (*values.items(), *masks.items()):
                binding.bind_ortvalue_input(name, value)

        # every set of masks made (also one made again after its arrays were evicted) has a serial of
        # its own, made after its set's: a binding that still points at evicted arrays is never used again
        return mask_serial, bind

    def _kept(self, cache: dict, key, make: Callable) -> tuple:
        """``cache[key]``, made by ``make`` when missing, the most recently used kept last and at
        most ``KEPT_SETS`` kept."""
        entry = cache.pop(key, None) or make()
        cache[key] = entry
        while len(cache) > self.KEPT_SETS:
            del cache[next(iter(cache))]
        return entry

    def _side_by_side(self, used: tuple[int, ...]) -> tuple[dict, dict, int]:
        """The matrices of the adapters in slots ``used`` side by side per graph input (OrtValues),
        each mask input's layout (a tuple of (slot, first column, rank), and the width), and a
        serial of its own (a rebuilt set is told from the one it replaces, whose arrays an older
        binding may still point at)."""
        from .session import import_onnxruntime

        ort = import_onnxruntime()
        values, layouts = {}, {}
        for p in self.lora.inputs:
            pa, pb = f"{p.projection}.a", f"{p.projection}.b"
            blocks = [(slot, *self._held[slot - 1][1:]) for slot in used if pa in self._held[slot - 1][1]]
            ranks = [m[pa].shape[1] for _, m, _ in blocks]  # a fused projection: its modules' ranks side by side
            starts = np.concatenate([[0], np.cumsum(ranks, dtype=np.int64)]).tolist()
            a = np.zeros((p.in_features, starts[-1]), self.dtype)
            b = np.zeros((starts[-1], p.out_features), self.dtype)
            for (_, m, scale), start, rank in zip(blocks, starts, ranks):
                a[:, start : start + rank] = m[pa]
                b[start : start + rank] = m[pb] * np.float32(scale)
            values[p.a], values[p.b] = ort.OrtValue.ortvalue_from_numpy(a), ort.OrtValue.ortvalue_from_numpy(b)
            layouts[p.mask] = (tuple((slot, start, rank) for (slot, _, _), start, rank in zip(blocks, starts, ranks)), starts[-1])
        self._serial += 1
        return values, layouts, self._serial

    def _row_masks(self, layouts: dict, rows: tuple[int, ...]) -> tuple[dict, int]:
        """Each mask input's [batch, 1, width] for rows of adapter slots ``rows`` (one OrtValue for
        every input of the same layout), and a serial of their own."""
        from .session import import_onnxruntime

        ort = import_onnxruntime()
        made: dict = {}
        masks = {}
        for name, layout in layouts.items():
            if layout not in made:
                blocks, width = layout
                mask = np.zeros((len(rows), 1, width), self.dtype)
                for slot, start, rank in blocks:
                    mask[[i for i, s in enumerate(rows) if s == slot], 0, start : start + rank] = 1
                made[layout] = ort.OrtValue.ortvalue_from_numpy(mask)
            masks[name] = made[layout]
        self._serial += 1
        return masks, self._serial

    def _changed(self) -> None:
        self._sets, self._masks = {}, {}


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
