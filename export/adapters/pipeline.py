"""``add_adapter``: a PEFT LoRA adapter added to an exported model directory.

Steps: read and check the PEFT directory (``peft_dir``) and the evaluation text; find the graph's
projections (``graph``) and place the adapter's matrices in them (``fuse``); write
``adapters/NAME/lora.npz``; the first time, rewrite the graph to take the LoRA inputs (written as
``model.lora.onnx`` beside the weights, which do not change); list the adapter in the manifest; then
measure the perplexity of the evaluation text with the adapter and without it, and record both in
its entry. The manifest is replaced at once, so an interrupted run leaves the directory as it was
or with the adapter listed (an unlisted adapter directory is replaced by the next run).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Callable

import numpy as np

from ...progress import to_stderr
from ...runtime.adapter_manifest import ADAPTER_NAME, AdapterEntry
from ...runtime.adapters import file_sha256
from ...runtime.manifest import Manifest, load_manifest
from ...runtime.model_dir import ADAPTERS_DIR, LORA_GRAPH_FILE
from ..errors import AdapterError
from .fuse import fuse
from .graph import Site, add_lora_inputs, find_sites
from .peft_dir import read_peft

MATRICES_FILE = "lora.npz"
EVAL_TOKENS = 1024  # of the evaluation text, for the perplexity recorded with each adapter


def add_adapter(
    model_dir: str | os.PathLike, peft_dir: str | os.PathLike, name: str, progress: Callable[[str], None] = to_stderr,
    eval_text: str | os.PathLike | None = None, eval_tokens: int = EVAL_TOKENS,
) -> AdapterEntry:
    """Add the LoRA adapter in ``peft_dir`` (PEFT's ``save_pretrained``) to the exported model in
    ``model_dir`` as adapter ``name``; returns its manifest entry, with the perplexity of
    ``eval_text`` (a file; None: the built-in reference text, as the quantization gate reads it; its
    first ``eval_tokens`` tokens) with the adapter and without it. The base may be fp32, fp16, int8
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
    ids, text_name = _eval_ids(model_dir, manifest, eval_text, eval_tokens)  # a bad text fails here, before any writing
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
        lora = add_lora_inputs(model, sites, graph.dtype)
        partial = os.path.join(model_dir, f".{LORA_GRAPH_FILE}.partial-{os.getpid()}")
        with open(partial, "wb") as f:
            f.write(model.SerializeToString())
        os.replace(partial, os.path.join(model_dir, LORA_GRAPH_FILE))
        graph = dataclasses.replace(graph, file=LORA_GRAPH_FILE)
    written = dataclasses.replace(manifest, graph=graph, lora=dataclasses.replace(lora, adapters=lora.adapters + (entry,)))
    written.write(model_dir)
    if graph.file != manifest.graph.file:
        os.remove(graph_path)  # no longer named by the manifest: the graph without LoRA inputs
    progress(f"… measuring the perplexity of {text_name} with {name} and without it")
    entry = dataclasses.replace(entry, quality=_quality(model_dir, name, ids, text_name))
    dataclasses.replace(written, lora=dataclasses.replace(lora, adapters=lora.adapters + (entry,))).write(model_dir)
    q = entry.quality
    progress(f"added adapter {name} to {model_dir}: rank {peft.rank}, scale {peft.scale:g}, {', '.join(targets)}; "
             f"perplexity of {text_name} {q['perplexity']:.3f} with it, {q['base_perplexity']:.3f} without")  # fmt: skip
    return entry


def _eval_ids(model_dir: str, manifest: Manifest, eval_text, eval_tokens: int) -> tuple[list[int], str]:
    from ...quantize.errors import QuantizeError
    from ...quantize.gate import eval_ids

    try:
        return eval_ids(model_dir, manifest, None if eval_text is None else os.fspath(eval_text), eval_tokens)
    except QuantizeError as e:
        raise AdapterError(str(e)) from None


def _quality(model_dir: str, name: str, ids: list[int], text_name: str) -> dict:
    """The perplexity of ``ids`` with adapter ``name`` and with the base model alone."""
    from ...runtime.model import LoadedModel
    from ...runtime.scoring import score_ids

    model = LoadedModel(model_dir, provider="cpu")
    adapted, base = score_ids(model, ids, adapter=model.adapter_slot(name)), score_ids(model, ids)
    return {"eval_text": text_name, "tokens": len(ids), "perplexity": round(adapted.perplexity, 4), "base_perplexity": round(base.perplexity, 4)}


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
