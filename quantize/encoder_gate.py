"""The quality gate of a quantized encoder: the sentences of the evaluation text run through the fp32
and the quantized directory, both by lmrt's runtime in the same batches.

  embed     the cosine similarity of each text's two embeddings: the mean must reach 0.99; the
            smallest is reported
  classify  the share of texts given the same label (the top label of a softmax classifier; every
            label's yes / no at a score of 0.5 for a sigmoid one) must reach 0.98; the largest
            score difference is reported

An int8 directory keeps 8-bit weight codes that run as 7-bit ones on CPUs without VNNI
(runtime/int8_codes.py): the gate measures the 7-bit path, which is exact on every CPU, and the
8-bit path too where this CPU computes it exactly, and judges by the worse of them; each path's
figure is kept under ``by_code_bits``.
"""

from __future__ import annotations

import re

import numpy as np

from ..runtime.cpu import exact_8bit_int8_products
from ..runtime.encoder import Encoder, label_scores
from ..runtime.int8_codes import stored_code_bits
from ..runtime.manifest import Manifest
from .errors import QuantizeError
from .gate import read_eval_text

MIN_MEAN_COSINE = 0.99
MIN_LABEL_AGREEMENT = 0.98
MAX_TEXTS = 256
MIN_TEXTS = 16


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` [n, d] with the same row of ``b``, in float64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


def eval_sentences(text_file: str | None) -> tuple[list[str], str]:
    """Up to MAX_TEXTS sentences (or lines) of the evaluation text, and its name."""
    text, name = read_eval_text(text_file)
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text)]
    sentences = [s for s in sentences if s][:MAX_TEXTS]
    if len(sentences) < MIN_TEXTS:
        raise QuantizeError(f"the evaluation text has {len(sentences)} sentences; the gate needs at least {MIN_TEXTS}")
    return sentences, name


class EncoderGate:
    """Measures a quantized encoder directory against its fp32 source."""

    def __init__(self, source_dir: str, manifest: Manifest, text_file: str | None):
        self.source_dir, self.task = source_dir, manifest.task
        self.score_function = manifest.encoder.score_function
        self.texts, self.name = eval_sentences(text_file)  # a bad text fails here, early
        self.what = "label agreement" if self.task == "classify" else "cosine similarity"
        self.limit = MIN_LABEL_AGREEMENT if self.task == "classify" else MIN_MEAN_COSINE

    def measure(self, candidate_dir: str, candidate: Manifest) -> dict:
        ref = Encoder(self.source_dir, provider="cpu").run(self.texts)
        # each path this CPU can run: 8-bit codes only where stored and exact here
        paths = ["7", "8"] if exact_8bit_int8_products() and stored_code_bits(candidate) == 8 else ["7"]
        measured = [self._compare(ref, Encoder(candidate_dir, provider="cpu", int8_codes=p).run(self.texts)) for p in paths]
        key = "label_agreement" if self.task == "classify" else "mean_cosine"
        quality = min(measured, key=lambda q: q[key])
        quality["by_code_bits"] = {p: q[key] for p, q in zip(paths, measured)}
        return quality

    def _compare(self, ref: np.ndarray, got: np.ndarray) -> dict:
        quality = {"eval_text": self.name, "texts": len(self.texts), "provider": "cpu"}
        if self.task == "classify":
            ref_scores, got_scores = label_scores(ref, self.score_function), label_scores(got, self.score_function)
            if self.score_function == "sigmoid":
                agree = np.all((ref_scores >= 0.5) == (got_scores >= 0.5), axis=-1)
            else:
                agree = ref_scores.argmax(-1) == got_scores.argmax(-1)
            quality["label_agreement"] = float(agree.mean())
            quality["max_score_diff"] = float(np.abs(ref_scores - got_scores).max())
            quality.update(min_label_agreement=self.limit, passed=quality["label_agreement"] >= self.limit)
        else:
            similarity = cosines(ref, got)
            quality["mean_cosine"], quality["min_cosine"] = float(similarity.mean()), float(similarity.min())
            quality.update(min_mean_cosine=self.limit, passed=quality["mean_cosine"] >= self.limit)
        return quality

    def summary(self, quality: dict, scheme: str) -> str:
        if self.task == "classify":
            return (
                f"label agreement with fp32 ({scheme}) {quality['label_agreement']:.1%} over {quality['texts']} texts, "
                f"largest score difference {quality['max_score_diff']:.3f}"
            )
        return (
            f"cosine similarity to fp32 ({scheme}) mean {quality['mean_cosine']:.4f}, min {quality['min_cosine']:.4f} "
            f"over {quality['texts']} texts"
        )

    @property
    def limit_text(self) -> str:
        if self.task == "classify":
            return f"below the required label agreement of {self.limit:.0%}"
        return f"below the required mean cosine similarity of {self.limit}"
