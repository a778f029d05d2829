"""The quality gate: perplexity and top-1 agreement of a quantized graph against its fp32 source,
both run by lmrt's own runtime on the same evaluation text."""

from __future__ import annotations

import os

import numpy as np

from ..runtime.manifest import Manifest, load_manifest, load_tokenizer
from ..runtime.model import LoadedModel
from ..runtime.scoring import score_ids
from .evaltext import read_text, reference_text
from .errors import QuantizeError

MIN_TOKENS = 64


def read_eval_text(text_file: str | None) -> tuple[str, str]:
    """The evaluation text (a file, or the built-in reference text) and its name."""
    if text_file is None:
        return reference_text(), "Python reference manual (pydoc_data.topics)"
    return read_text(text_file, "the evaluation text"), os.path.basename(text_file)


def eval_ids(model_dir: str, manifest: Manifest, text_file: str | None, max_tokens: int) -> tuple[list[int], str]:
    """Token ids of the evaluation text (a file, or the built-in reference text) and its name."""
    text, name = read_eval_text(text_file)
    tokenizer = load_tokenizer(model_dir, manifest)
    try:
        ids = tokenizer.encode(text).ids[:max_tokens]
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions (a word missing from a vocabulary without <unk>)
        raise QuantizeError(
            f"the tokenizer cannot read {name}: {' '.join(str(e).split())}; give an evaluation text in the model's "
            "vocabulary (--eval-text, eval_text=)"
        ) from None
    if len(ids) < MIN_TOKENS:
        raise QuantizeError(f"the evaluation text has {len(ids)} tokens; the gate needs at least {MIN_TOKENS}")
    return ids, name


def measure_quality(reference_dir: str, candidate_dir: str, candidate: Manifest, ids: list[int], name: str) -> dict:
    reference = load_manifest(reference_dir)
    ref = score_ids(LoadedModel(reference_dir, provider="cpu", manifest=reference), ids)
    got = score_ids(LoadedModel(candidate_dir, provider="cpu", manifest=candidate), ids)
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


class PerplexityGate:
    """Measures a quantized decoder directory against its fp32 source: perplexity may rise by at
    most ``limit`` (a fraction)."""

    what = "perplexity"

    def __init__(self, source_dir: str, manifest: Manifest, text_file: str | None, max_tokens: int, limit: float):
        self.source_dir, self.limit = source_dir, limit
        self.ids, self.name = eval_ids(source_dir, manifest, text_file, max_tokens)  # a bad text fails here, early

    def measure(self, candidate_dir: str, candidate: Manifest) -> dict:
        quality = measure_quality(self.source_dir, candidate_dir, candidate, self.ids, self.name)
        quality.update(max_increase=self.limit, passed=quality["increase"] <= self.limit)
        return quality

    def summary(self, quality: dict, scheme: str) -> str:
        return (
            f"perplexity {quality['perplexity_reference']:.3f} (fp32) -> {quality['perplexity']:.3f} ({scheme}), "
            f"{quality['increase']:+.2%}; top-1 agreement {quality['top1_agreement']:.1%} over {quality['positions']} positions"
        )

    @property
    def limit_text(self) -> str:
        return f"above the allowed +{self.limit:.1%}"
