"""Scoring text with an exported model: per-token log-probabilities and perplexity.

A text longer than the model's context is scored in overlapping windows: each window starts a fresh
KV cache, is fed in chunks that reuse the cache, and scores only the tokens the previous window did
not, so every token after the first is scored exactly once, with at least ``window - stride`` tokens
of context once the first window is past.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .model import OnnxCausalLM
from .sampling import log_softmax


@dataclass(frozen=True)
class Score:
    """Log-probabilities of ``token_ids[1:]``, each given the tokens before it."""

    token_ids: tuple[int, ...]
    logprobs: np.ndarray  # float64 [n - 1]: log p(token_ids[i + 1] | token_ids[: i + 1])
    argmax: np.ndarray  # int64 [n - 1]: the model's top-1 prediction at each scored position

    @property
    def num_scored(self) -> int:
        return int(self.logprobs.shape[0])

    @property
    def mean_nll(self) -> float:
        """Mean negative log-likelihood in nats per token."""
        return float(-self.logprobs.mean())

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


def _count(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def resolve_windows(
    window: int | None, stride: int | None, context: int, names: tuple[str, str] = ("window", "stride")
) -> tuple[int, int]:
    """(window, stride) for scoring with a model of ``context`` positions: ``window`` defaults to
    the context and ``stride`` to half the window. ValueError, naming the value as ``names`` spell it
    (the CLI passes its flags), unless 2 <= window <= context and 1 <= stride <= window."""
    window_name, stride_name = names
    if window is None:
        window = context
    elif not _count(window) or window < 2:
        raise ValueError(f"{window_name} must be a whole number of tokens, at least 2; got {window!r}")
    elif window > context:
        raise ValueError(f"{window_name} is {window} tokens, more than the model's context ({context})")
    if stride is None:
        stride = max(1, window // 2)
    elif not _count(stride) or not 1 <= stride <= window:
        raise ValueError(f"{stride_name} must be a whole number of tokens from 1 to the window ({window}); got {stride!r}")
    return int(window), int(stride)


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window over ``n`` tokens: the window feeds tokens
    [begin, end) and scores the predictions of tokens [first_scored, end). Each window ends at
    least one token after the one before, so the list is finite."""
    if window < 2 or not 0 < stride <= window:
        raise ValueError(f"windows need window >= 2 and stride in 1..window, got window {window}, stride {stride}")
    out, scored_to, begin = [], 1, 0
    while scored_to < n:
        end = min(begin + window, n)
        out.append((begin, end, scored_to))
        scored_to = end
        begin = max(0, end - max(1, window - stride)) if end < n else end  # keep >= 1 token of context
    return out


def score_ids(
    model: OnnxCausalLM,
    token_ids: Sequence[int],
    window: int | None = None,
    stride: int | None = None,
    chunk: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> Score:
    """Score ``token_ids`` (at least two) with ``model``; ``window`` defaults to the context length
    and ``stride`` to half the window (see ``resolve_windows``)."""
    window, stride = resolve_windows(window, stride, model.context_length)
    ids = np.asarray(token_ids, dtype=np.int64)  # [n]
    n = ids.shape[0]
    if n < 2:
        raise ValueError("scoring needs at least two tokens")
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    logprobs = np.empty(n - 1, dtype=np.float64)
    argmax = np.empty(n - 1, dtype=np.int64)
    for begin, end, first in windows(n, window, stride):
        model.reset(batch=1, capacity=end - begin)
        for start in range(begin, end, chunk):
            stop = min(start + chunk, end)
            logits = model.forward(ids[None, start:stop])[0]  # [seq, vocab]: position p predicts token p + 1
            # predictions for targets t in [max(start + 1, first), min(stop + 1, end))
            lo, hi = max(start + 1, first), min(stop + 1, end)
            if lo >= hi:
                continue
            rows = logits[lo - 1 - start : hi - 1 - start]  # [hi - lo, vocab]
            lp = log_softmax(rows)
            logprobs[lo - 1 : hi - 1] = lp[np.arange(hi - lo), ids[lo:hi]]
            argmax[lo - 1 : hi - 1] = rows.argmax(-1)
        if progress:
            progress(end, n)
    return Score(tuple(int(t) for t in ids), logprobs, argmax)
