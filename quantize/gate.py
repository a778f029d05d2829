"""The quality gate: perplexity and top-1 agreement of a quantized graph against its fp32 source,
both run by lmrt's own runtime on the same evaluation text."""

from __future__ import annotations

import os

import numpy as np

from ..runtime.manifest import Manifest, load_manifest, load_tokenizer
from ..runtime.model import OnnxCausalLM
from ..runtime.scoring import score_ids
from .evaltext import read_text, reference_text
from .errors import QuantizeError

MIN_TOKENS = 64


def eval_ids(model_dir: str, manifest: Manifest, text_file: str | None, max_tokens: int) -> tuple[list[int], str]:
    """Token ids of the evaluation text (a file, or the built-in reference text) and its name."""
    if text_file is not None:
        text, name = read_text(text_file, "the evaluation text"), os.path.basename(text_file)
    else:
        text, name = reference_text(), "Python reference manual (pydoc_data.topics)"
    tokenizer = load_tokenizer(model_dir, manifest)
    ids = tokenizer.encode(text).ids[:max_tokens]
    if len(ids) < MIN_TOKENS:
        raise QuantizeError(f"the evaluation text has {len(ids)} tokens; the gate needs at least {MIN_TOKENS}")
    return ids, name


def measure_quality(reference_dir: str, candidate_dir: str, candidate: Manifest, ids: list[int], name: str) -> dict:
    reference = load_manifest(reference_dir)
    ref = score_ids(OnnxCausalLM(reference_dir, reference, provider="cpu"), ids)
    got = score_ids(OnnxCausalLM(candidate_dir, candidate, provider="cpu"), ids)
    return {
        "eval_text": name,
        "tokens": len(ids),
        "positions": got.num_scored,
        "perplexity_reference": ref.perplexity,
        "perplexity": got.perplexity,
        "increase": got.perplexity / ref.perplexity - 1.0,
        "top1_agreement": float(np.mean(ref.argmax == got.argmax)),
        "provider": "cpu",
    }
