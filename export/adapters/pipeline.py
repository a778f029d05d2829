"""``add_adapter``: a PEFT LoRA adapter added to an exported model directory.

Steps: read and check the PEFT directory (``peft_dir``); find the graph's projections (``graph``)
and place the adapter's matrices in them (``fuse``); write ``adapters/NAME/lora.npz``; the first
time, rewrite the graph to take the LoRA inputs (written as ``model.lora.onnx`` beside the weights,
which do not change); list the adapter in the manifest. The manifest is replaced last, at once, so
an interrupted run leaves the directory as it was (an unlisted adapter directory is replaced by the
next run).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Callable

import numpy as np

from ...progress import to_stderr
from ...runtime.adapter_manifest import ADAPTER_NAME, AdapterEntry, Lora
from ...runtime.adapters import file_sha256
from ...runtime.manifest import Manifest, load_manifest
from ...runtime.model_dir import ADAPTERS_DIR, LORA_GRAPH_FILE
from ..errors import AdapterError
from .fuse import fuse
from .graph import Site, add_lora_inputs, find_sites
from .peft_dir import read_peft

MATRICES_FILE = "lora.npz"


def add_adapter(
    model_dir: str | os.PathLike, peft_dir: str | os.PathLike, name: str, progress: Callable[[str], None] = to_stderr
) -> AdapterEntry:
    """Add the LoRA adapter in ``peft_dir`` (PEFT's ``save_pretrained``) to the exported model in
    ``model_dir`` as adapter ``name``; returns its manifest entry. The base may be fp32, fp16, int8
    or int4; the adapter stays float. AdapterError, in one line, for an adapter lmrt cannot compute
    or one that does not belong to this model."""
    model_dir, peft_dir = os.fspath(model_dir), os.fspath(peft_dir)
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise AdapterError(
            f"an adapter name is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit; got {name!r}"
        )
    manifest = load_manifest(model_dir)
    layout = _layout(manifest, model_dir)
    if manifest.lora is not None and manifest.lora.entry(name) is not None:
        raise AdapterError(f"{model_dir} already has an adapter named {name!r}; choose another name")
    progress(f"… reading the adapter in {peft_dir}")
    peft = read_peft(peft_dir)
    import onnx

    graph_path = os.path.join(model_dir, manifest.graph.file)
    model = onnx.load(graph_path, load_external_data=False)  # the weights stay where they are
    sites = find_sites(model, layout, manifest.architecture)
    matrices, targets = fuse(peft, layout, manifest.architecture, sites)
    relative = _write_matrices(model_dir, name, matrices)
    entry = AdapterEntry(
        name, relative, file_sha256(os.path.join(model_dir, relative)), peft.rank, peft.alpha, peft.use_rslora,
        peft.scale, targets, peft.base_model,
    )  # fmt: skip
    lora, graph = manifest.lora, manifest.graph
    if lora is None:
        progress("… adding the LoRA inputs to the graph")
        lora = Lora(inputs=add_lora_inputs(model, sites, Lora.index, graph.dtype))
        partial = os.path.join(model_dir, f".{LORA_GRAPH_FILE}.partial-{os.getpid()}")
        with open(partial, "wb") as f:
            f.write(model.SerializeToString())
        os.replace(partial, os.path.join(model_dir, LORA_GRAPH_FILE))
        graph = dataclasses.replace(graph, file=LORA_GRAPH_FILE)
    lora = dataclasses.replace(lora, adapters=lora.adapters + (entry,))
    dataclasses.replace(manifest, graph=graph, lora=lora).write(model_dir)
    if graph.file != manifest.graph.file:
        os.remove(graph_path)  # no longer named by the manifest: the graph without LoRA inputs
    progress(f"added adapter {name} to {model_dir}: rank {peft.rank}, scale {peft.scale:g}, {', '.join(targets)}")
    return entry


def peft_matrices(model_dir: str, manifest: Manifest, peft_dir: str) -> tuple[dict[str, np.ndarray], float]:
    """The matrices of the LoRA adapter in ``peft_dir`` placed in the projections of the graph of
    ``manifest`` (one with LoRA inputs), as ``adapters.read_adapter`` gives an added one's, and its
    scale; nothing is written (an adapter loaded while serving). The checks of ``add_adapter``."""
    layout = _layout(manifest, model_dir)
    peft = read_peft(peft_dir)
    sites = {p.projection: Site(p.a, p.b, p.in_features, p.out_features) for p in manifest.lora.inputs}
    matrices, _ = fuse(peft, layout, manifest.architecture, sites)
    return matrices, peft.scale


def _layout(manifest: Manifest, model_dir: str):
    """The layout of the family that wrote the graph; AdapterError for a model that has none."""
    from ..architectures import REGISTRY

    arch = manifest.architecture
    spec = REGISTRY.get(arch.model_type)
    if manifest.task != "generate" or manifest.graph.state or manifest.graph.decoding != "step":
        raise AdapterError(f"{model_dir} is not an exported decoder of a Hugging Face family; adapters apply to those only")
    if spec is None or spec.family != arch.family or spec.layout is None:
        raise AdapterError(f"{model_dir} holds a {arch.model_type} model, whose graph lmrt cannot add adapters to")
    return spec.layout


def _write_matrices(model_dir: str, name: str, matrices: dict[str, np.ndarray]) -> str:
    """Write ``adapters/NAME/lora.npz`` (through a hidden directory renamed into place); returns its
    path relative to the model directory."""
    parent = os.path.join(model_dir, ADAPTERS_DIR)
    os.makedirs(parent, exist_ok=True)
    final, partial = os.path.join(parent, name), os.path.join(parent, f".{name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        np.savez(os.path.join(partial, MATRICES_FILE), **matrices)
        if os.path.lexists(final):  # left by an interrupted run: the manifest does not list it
            shutil.rmtree(final)
        os.rename(partial, final)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return f"{ADAPTERS_DIR}/{name}/{MATRICES_FILE}"
