"""The adapters a model holds, loaded once and shared by every row that uses them.

A step's graph takes, for each adapted projection (``adapter_manifest.py``), the A and B matrices of
its adapters one group each ([groups, in, rank] and [groups, rank, out]; B multiplied by its
adapter's scale, once), and the places of the rows' positions in the groups. The bank keeps each
projection's matrices of every adapter it holds in one stack, [slots, in, rank] (rank: the largest
of the adapters held, the smaller ones padded with zeros); ``for_rows`` binds a view of the slots a
step's rows use, from the first to the last (no matrix is copied for a step), so a step reads each
adapter once whatever number of rows use it, and a step with no adapter reads none (rank 0). Slot 0
is no adapter, slot k the k-th adapter held.

The set may change while serving (``add`` and ``remove``, from the engine's thread between two
steps): each change builds new stacks (the arrays a step has bound are never written to) and drops
the kept places, so the next step binds anew. A slot keeps its adapter while it is held; a removed
adapter's slot is taken again only by ``add`` once no row of the state stores is tagged with it
(``add``'s ``tagged``), so no row's cache is reused under another adapter.
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

    KEPT_PLACES = 8  # the places of this many sets of rows (slots and sequence length) are kept

    def __init__(self, model_dir: str, lora: Lora, dtype: str):
        self.model_dir, self.lora, self.dtype = model_dir, lora, dtype
        self._names: list[str | None] = []  # per slot from 1; None for a freed slot
        self._ranks: dict[int, dict[str, int]] = {}  # slot held -> its rank per projection it adapts
        self._stacks: dict[str, np.ndarray] = {}  # graph input -> [slots, in, rank] / [slots, rank, out]
        self._places: dict[tuple, tuple[int, dict]] = {}  # (rows' slots, seq) -> (serial, OrtValues)
        self._serial = 0
        self._none = {}  # a step without adapters: rank 0
        for p in lora.inputs:
            self._none[p.a], self._none[p.b] = np.zeros((1, p.in_features, 0), dtype), np.zeros((1, 0, p.out_features), dtype)
        self._restack({slot: (entry.name, read_adapter(model_dir, entry, lora), entry.scale) for slot, entry in enumerate(lora.adapters, start=1)})

    @property
    def names(self) -> tuple[str, ...]:
        """The adapters held, in slot order."""
        return tuple(n for n in self._names if n is not None)

    def slot(self, name: str | None) -> int:
        """The slot of adapter ``name`` (None: 0, the base model); ConfigError for a name not held."""
        if name is None:
            return 0
        if name in self.names:
            return self._names.index(name) + 1
        raise ConfigError("adapter", f"{name!r} is not an adapter of this model; it has {', '.join(self.names) or 'none'}")

    def add(self, name: str, matrices: dict[str, np.ndarray], scale: float, tagged: set[int] = frozenset()) -> int:
        """Hold adapter ``name`` (its matrices as ``read_adapter`` gives them) and return its slot: a
        freed slot no row is ``tagged`` with, or a new one."""
        if name in self.names:
            raise AdapterChangeError(f"the adapter '{name}' is already loaded", "held")
        check_fits(name, matrices, self.lora)
        free = [s for s, held in enumerate(self._names, start=1) if held is None and s not in tagged]
        slot = free[0] if free else len(self._names) + 1
        while slot in tagged:  # a freed last slot (not kept in the stacks) that rows are still tagged with
            slot += 1
        self._restack({slot: (name, matrices, scale)})
        return slot

    def remove(self, name: str) -> int:
        """Stop holding adapter ``name``; returns the slot it had."""
        if name not in self.names:
            raise AdapterChangeError(f"the adapter '{name}' is not loaded", "unknown")
        slot = self.slot(name)
        self._restack({slot: None})
        return slot

    def for_rows(self, slots: np.ndarray, seq: int) -> tuple[int, Callable]:
        """For rows running with adapter ``slots`` (int64 [batch]), ``seq`` positions each: a key that
        changes whenever what must be bound does (an IO binding keyed by it is bound again), and a
        function that binds the matrices of the rows' adapters and the places of their positions to
        an IO binding."""
        key = (tuple(slots.tolist()), seq)
        serial, values = self._places.pop(key, None) or self._make_places(*key)
        self._places[key] = (serial, values)  # the most recently used last
        while len(self._places) > self.KEPT_PLACES:
            del self._places[next(iter(self._places))]

        def bind(binding) -> None:
            for name, value in values.items():
                binding.bind_ortvalue_input(name, value)

        # every set of places made (also one made again after it was dropped) has a serial of its
        # own: a binding that points at dropped arrays is never used again
        return serial, bind

    def _make_places(self, rows: tuple[int, ...], seq: int) -> tuple[int, dict]:
        """The graph's adapter inputs for rows of adapter slots ``rows``, ``seq`` positions each
        (OrtValues by input name), and a serial of their own."""
        from .session import import_onnxruntime

        ort = import_onnxruntime()
        used = sorted(set(rows) - {0})
        first = used[0] if used else 0
        groups = used[-1] - first + 1 if used else 1
        counts = [0] * groups
        for slot in rows:
            if slot:
                counts[slot - first] += seq
        # rows without an adapter point at a padding place: in the group with the fewest positions,
        # one more place only when every group is full (no padding: one position of a group is
        # a vector-matrix product, which onnxruntime runs without packing the matrix)
        places, spare = max(counts), int(np.argmin(counts))
        places += 0 in rows and counts[spare] == places
        index = np.zeros((groups, places), np.int64)
        valid = np.zeros((groups, places, 1), self.dtype)
        back = np.zeros((len(rows), seq, 2), np.int64)
        back[:, :, 0], back[:, :, 1] = spare, places - 1
        filled = [0] * groups
        for i, slot in enumerate(rows):
            if slot:
                g, at = slot - first, filled[slot - first]
                index[g, at : at + seq] = np.arange(i * seq, (i + 1) * seq)
                valid[g, at : at + seq] = 1
                back[i, :, 0], back[i, :, 1] = g, np.arange(at, at + seq)
                filled[g] += seq
        values = {self.lora.index: index, self.lora.valid: valid, self.lora.back: back}
        for name, stack in self._stacks.items():  # a view of the slots used, from the first to the last
            values[name] = stack[first - 1 : first - 1 + groups] if used else self._none[name]
        self._serial += 1
        return self._serial, {name: ort.OrtValue.ortvalue_from_numpy(v) for name, v in values.items()}

    def _restack(self, changes: dict[int, tuple[str, dict[str, np.ndarray], float] | None]) -> None:
        """Build the stacks anew with ``changes`` made: slot -> (name, matrices as ``read_adapter``
        gives them, scale) held there from now, or None to free it; the other slots keep theirs."""
        names, ranks = list(self._names), dict(self._ranks)
        names += [None] * (max(changes, default=0) - len(names))
        for slot, change in changes.items():
            names[slot - 1] = None if change is None else change[0]
            ranks.pop(slot, None)
            if change is not None:
                ranks[slot] = {key[: -len(".a")]: m.shape[1] for key, m in change[1].items() if key.endswith(".a")}
        while names and names[-1] is None:
            names.pop()
        stacks = {}
        for p in self.lora.inputs:
            rank = max((r.get(p.projection, 0) for r in ranks.values()), default=0)  # smaller ones padded
            a = np.zeros((len(names), p.in_features, rank), self.dtype)
            b = np.zeros((len(names), rank, p.out_features), self.dtype)
            for slot, own in ranks.items():
                r = own.get(p.projection, 0)
                if not r:
                    continue
                if slot in changes:
                    _, m, scale = changes[slot]
                    a[slot - 1, :, :r] = m[f"{p.projection}.a"]
                    b[slot - 1, :r] = m[f"{p.projection}.b"] * np.float32(scale)
                else:
                    a[slot - 1, :, :r] = self._stacks[p.a][slot - 1, :, :r]
                    b[slot - 1, :r] = self._stacks[p.b][slot - 1, :r]
            stacks[p.a], stacks[p.b] = a, b
        self._names, self._ranks, self._stacks, self._places = names, ranks, stacks, {}


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
