"""Encoder: texts in, sentence embeddings or labels out, for model directories exported with the
task "embed" or "classify".

The graph does the pooling and normalization itself (embed) or ends in the classification head
(classify), so one run gives the final vector of each text. Texts are tokenized, sorted by length
and cut into batches, so each batch is padded only to its own longest text.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from .manifest import EncoderInfo, load_manifest, load_tokenizer, require_task
from .memory import settle_memory
from .compat import check_onnxruntime
from .int8_codes import session_initializers
from .session import available_providers, create_session, resolve_provider

DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class Label:
    """One label of a classification: its name, its score (softmax or sigmoid of its logit, as the
    model was trained) and its index among the model's logits."""

    label: str
    score: float
    index: int


class Encoder:
    """A loaded encoder.

    Thread-safe: nothing in an Encoder changes after it is built, and each call tokenizes and runs
    its own batches (onnxruntime runs one session from several threads at once), so a server may
    share one Encoder between its request threads.

    >>> from lmrt import runtime
    >>> enc = runtime.Encoder("models/minilm")
    >>> enc.embed(["A cat sits on the mat.", "Ein Hund spielt."]).shape
    (2, 384)

    ``truncate``: texts longer than the model's ``max_length`` tokens are cut to it (True, the
    default) or refused with a ValueError (False); each call may override it.

    ``int8_codes``: the weight codes of an int8 directory: "auto" (8-bit where this CPU's products of
    them are exact, 7-bit made in memory elsewhere), "7" or "8" to force one; None reads the
    LMRT_INT8_CODES environment variable, "auto" when unset (runtime/int8_codes.py).
    ``int8_code_bits`` says what runs: 7, 8, or None for a float graph.
    """

    def __init__(
        self, model_dir: str | os.PathLike, provider: str = "auto", threads: int | None = None, truncate: bool = True,
        int8_codes: str | None = None,
    ):
        self.model_dir = os.fspath(model_dir)
        self.manifest = load_manifest(self.model_dir)
        require_task(self.manifest, ("embed", "classify"), self.model_dir)
        self.info: EncoderInfo = self.manifest.encoder
        self.io = self.manifest.graph.io
        self.truncate = truncate
        check_onnxruntime(self.manifest, self.model_dir)
        chosen = resolve_provider(provider, available_providers())
        path = os.path.join(self.model_dir, self.manifest.graph.file)
        self.int8_code_bits, self._initializers = session_initializers(self.manifest, path, int8_codes)
        self.session, self.provider = create_session(path, chosen, self.model_dir, threads, self._initializers)
        self._tokenizer = load_tokenizer(self.model_dir, self.manifest)  # cuts texts to max_length
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(self.info.max_length)
        self._counter = load_tokenizer(self.model_dir, self.manifest)  # counts the tokens of a text it refuses
        self._counter.no_padding()
        self._counter.no_truncation()
        pad = self.manifest.tokenizer.pad_token_id
        self._pad_id = 0 if pad is None else pad
        settle_memory(self.model_dir, self.manifest)

    @property
    def task(self) -> str:
        """"embed" or "classify"."""
        return self.manifest.task

    @property
    def dimension(self) -> int:
        """Size of each output vector: the embedding size, or the number of labels."""
        return self.info.dimension

    @property
    def max_length(self) -> int:
        """Tokens per text, special tokens included."""
        return self.info.max_length

    @property
    def labels(self) -> tuple[str, ...]:
        """The classifier's labels, in the order of its logits (empty for an embedding model)."""
        return self.info.labels

    def tokenize(self, texts: str | Sequence[str], truncate: bool | None = None) -> list[list[int]]:
        """Token ids of each text, special tokens included, as the graph receives them."""
        texts = _texts(texts)
        truncate = self.truncate if truncate is None else truncate
        encodings = self._tokenizer.encode_batch(texts)
        if not truncate:
            self._refuse_overflow(encodings, [(text,) for text in texts], "text")
        return [enc.ids for enc in encodings]

    def tokenize_pairs(
        self, pairs: Sequence[tuple[str, str]], truncate: bool | None = None
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids and token types of each (first, second) text pair, encoded as one sentence pair
        the way the model's tokenizer joins them (the longer text cut first when too long)."""
        pairs = _pairs(pairs)
        truncate = self.truncate if truncate is None else truncate
        encodings = self._tokenizer.encode_batch(pairs)
        if not truncate:
            self._refuse_overflow(encodings, pairs, "pair")
        return [enc.ids for enc in encodings], [enc.type_ids for enc in encodings]

    def _refuse_overflow(self, encodings, inputs: Sequence[tuple[str, ...]], what: str) -> None:
        """ValueError naming the first input (a text, or a pair of texts) longer than the model."""
        for i, enc in enumerate(encodings):
            if enc.overflowing:
                n = len(self._counter.encode(*inputs[i]).ids)
                raise ValueError(f"{what} {i + 1} has {n} tokens, more than the model's {self.max_length}; "
                                 "shorten it or allow truncation")

    def pair_scores(
        self, pairs: Sequence[tuple[str, str]], batch_size: int = DEFAULT_BATCH_SIZE, truncate: bool | None = None
    ) -> np.ndarray:
        """A cross-encoder's score of each (query, document) pair, float32 [len(pairs)], as
        sentence-transformers' CrossEncoder gives it: the sigmoid of a single logit, or the softmax
        score of the second label ("relevant") of two."""
        return self.pair_scores_of_ids(*self.tokenize_pairs(pairs, truncate), batch_size)

    def pair_scores_of_ids(
        self, ids: Sequence[Sequence[int]], type_ids: Sequence[Sequence[int]], batch_size: int = DEFAULT_BATCH_SIZE
    ) -> np.ndarray:
        """``pair_scores`` for pairs already tokenized (``tokenize_pairs``)."""
        self._expect("classify")
        if self.dimension > 2:
            raise ValueError(f"{self.model_dir} has {self.dimension} labels; a cross-encoder has one logit (or two)")
        logits = self.run_ids(ids, batch_size, type_ids)
        if self.dimension == 1:
            return label_scores(logits, "sigmoid")[:, 0]
        return label_scores(logits, "softmax")[:, 1]

    def tokenize_keeping_last(self, texts: str | Sequence[str], keep: int | None) -> list[list[int]]:
        """Token ids of each text, special tokens included, whole (``keep`` None) or cut to its last
        ``keep`` tokens as vLLM's ``truncate_prompt_tokens`` cuts them: the special tokens at either
        end stay, the text's first tokens go. ValueError when ``keep`` leaves no room for text."""
        out = []
        for enc in self._counter.encode_batch(_texts(texts)):
            ids = list(enc.ids)
            if keep is not None and len(ids) > keep:
                mask = enc.special_tokens_mask
                lead = next((i for i, special in enumerate(mask) if not special), len(mask))
                trail = next((i for i, special in enumerate(reversed(mask)) if not special), 0)
                room = keep - lead - trail
                if room < 1:
                    raise ValueError(f"keeping {keep} tokens leaves no room for text beside the {lead + trail} special tokens")
                ids = ids[:lead] + ids[len(ids) - trail - room :]
            out.append(ids)
        return out

    def run(
        self, texts: str | Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE, truncate: bool | None = None
    ) -> np.ndarray:
        """The graph's output for each text, float32 [len(texts), dimension]: the embeddings of an
        embedding model, the logits of a classifier."""
        return self.run_ids(self.tokenize(texts, truncate), batch_size)

    def run_ids(
        self, ids: Sequence[Sequence[int]], batch_size: int = DEFAULT_BATCH_SIZE,
        type_ids: Sequence[Sequence[int]] | None = None,
    ) -> np.ndarray:
        """``run`` for texts already tokenized (special tokens included, at most ``max_length``
        each), float32 [len(ids), dimension]; ``type_ids``: each token's type (a sentence pair's
        second text: 1), for a graph that takes them (None: every token type 0)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if any(not 0 < len(one) <= self.max_length for one in ids):
            raise ValueError(f"each text must have from 1 to {self.max_length} tokens")
        out = np.empty((len(ids), self.dimension), np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            longest = len(ids[rows[-1]])
            input_ids = np.full((len(rows), longest), self._pad_id, np.int64)
            mask = np.zeros((len(rows), longest), np.int64)
            for r, i in enumerate(rows):
                input_ids[r, : len(ids[i])] = ids[i]
                mask[r, : len(ids[i])] = 1
            feeds = {self.io.input_ids: input_ids, self.io.attention_mask: mask}
            if self.io.token_type_ids:
                types = np.zeros_like(input_ids)
                for r, i in enumerate(rows):
                    types[r, : len(ids[i])] = type_ids[i] if type_ids is not None else 0
                feeds[self.io.token_type_ids] = types
            out[rows] = self.session.run([self.io.output], feeds)[0]
        return out

    def embed(
        self, texts: str | Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE, truncate: bool | None = None
    ) -> np.ndarray:
        """Sentence embeddings, float32 [len(texts), dimension], pooled (and normalized) the way the
        model's own pipeline does it. A single string counts as a list of one."""
        self._expect("embed")
        return self.run(texts, batch_size, truncate)

    def logits(
        self, texts: str | Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE, truncate: bool | None = None
    ) -> np.ndarray:
        """The classifier's logits, float32 [len(texts), number of labels]."""
        self._expect("classify")
        return self.run(texts, batch_size, truncate)

    def scores(
        self, texts: str | Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE, truncate: bool | None = None
    ) -> np.ndarray:
        """Each label's score, float32 [len(texts), number of labels]: the softmax of the logits for
        a single-label classifier, their sigmoid for a multi-label one (or a single logit)."""
        return label_scores(self.logits(texts, batch_size, truncate), self.info.score_function)

    def classify(
        self,
        texts: str | Sequence[str],
        top_k: int | None = 1,
        batch_size: int = DEFAULT_BATCH_SIZE,
        truncate: bool | None = None,
    ) -> list[list[Label]]:
        """The ``top_k`` best labels of each text, best first (``None``: every label)."""
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        scores = self.scores(texts, batch_size, truncate)
        k = self.dimension if top_k is None else min(int(top_k), self.dimension)
        out = []
        for row in scores:
            best = np.argsort(-row, kind="stable")[:k]
            out.append([Label(self.labels[j], float(row[j]), int(j)) for j in best])
        return out

    def _expect(self, task: str) -> None:
        if self.task != task:
            what = "an embedding model, which gives embeddings, not labels" if self.task == "embed" else (
                "a classifier, which gives labels, not embeddings")  # fmt: skip
            raise ValueError(f"{self.model_dir} holds {what}")


def label_scores(logits: np.ndarray, score_function: str) -> np.ndarray:
    """Scores from logits [n, labels]: "sigmoid" of each logit, or the "softmax" of each row."""
    logits = np.asarray(logits, np.float64)
    if score_function == "sigmoid":
        return np.exp(-np.logaddexp(0.0, -logits)).astype(np.float32)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)


def _pairs(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    if isinstance(pairs, (str, bytes, bytearray)) or not isinstance(pairs, Sequence):
        raise ValueError(f"pairs must be a list of (text, text) pairs, got {type(pairs).__name__}")
    for i, p in enumerate(pairs):
        if not (isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(t, str) for t in p)):
            raise ValueError(f"pair {i + 1} is not two strings")
    return [tuple(p) for p in pairs]


def _texts(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Sequence):
        raise ValueError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"text {i + 1} is a {type(t).__name__}, not a string")
    return list(texts)
