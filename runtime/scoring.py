"""Scoring text with an exported model: per-token log-probabilities and perplexity.

A text longer than the model's context is scored in overlapping windows: each window starts an empty
row of state (borrowed from the caller's state store), is fed in chunks that reuse the cache, and scores only the tokens the previous window did
not, so every token after the first is scored exactly once, with at least ``window - stride`` tokens
of context once the first window is past.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .checks import is_int
from .model import LoadedModel
from .sampling import log_softmax, top_logprobs
from .state_store import StateStore


@dataclass(frozen=True)
class Score:
    """Log-probabilities of ``token_ids[1:]``, each given the tokens before it."""

    token_ids: tuple[int, ...]
    logprobs: np.ndarray  # float64 [n - 1]: log p(token_ids[i + 1] | token_ids[: i + 1])
    argmax: np.ndarray  # int64 [n - 1]: the model's top-1 prediction at each scored position
    ranks: np.ndarray  # int64 [n - 1]: 1 + how many tokens the model found likelier than token_ids[i + 1]
    top: tuple[tuple[tuple[int, float], ...], ...] = ()  # per scored position, the ``top`` likeliest (id, logprob)

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


def resolve_windows(
    window: int | None, stride: int | None, context: int, names: tuple[str, str] = ("window", "stride")
) -> tuple[int, int]:
    """(window, stride) for scoring with a model of ``context`` positions: ``window`` defaults to
    the context and ``stride`` to half the window. ValueError, naming the value as ``names`` spell it
    (the CLI passes its flags), unless 2 <= window <= context and 1 <= stride <= window."""
    window_name, stride_name = names
    if window is None:
        window = context
    elif not is_int(window) or window < 2:
        raise ValueError(f"{window_name} must be a whole number of tokens, at least 2; got {window!r}")
    elif window > context:
        raise ValueError(f"{window_name} is {window} tokens, more than the model's context ({context})")
    if stride is None:
        stride = max(1, window // 2)
    elif not is_int(stride) or not 1 <= stride <= window:
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
    model: LoadedModel,
    token_ids: Sequence[int],
    window: int | None = None,
    stride: int | None = None,
    chunk: int = 256,
    progress: Callable[[int, int], None] | None = None,
    store: StateStore | None = None,
    top: int = 0,
    adapter: int = 0,
) -> Score:
    """Score ``token_ids`` (at least two) with ``model``; ``window`` defaults to the context length
    and ``stride`` to half the window (see ``resolve_windows``). The windows run in a row borrowed
    from ``store`` (default: a store of its own); the store's other rows are left as they were.
    ``top``: also the ``top`` likeliest tokens at each scored position; ``adapter``: the slot of the
    LoRA adapter to score with (0: the base model)."""
    window, stride = resolve_windows(window, stride, model.context_length)
    ids = np.asarray(token_ids, dtype=np.int64)  # [n]
    n = ids.shape[0]
    if n < 2:
        raise ValueError("scoring needs at least two tokens")
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    if not is_int(top) or top < 0:
        raise ValueError(f"top must be a whole number >= 0, got {top!r}")
    logprobs = np.empty(n - 1, dtype=np.float64)
    argmax = np.empty(n - 1, dtype=np.int64)
    ranks = np.empty(n - 1, dtype=np.int64)
    best: list[tuple[tuple[int, float], ...]] = [()] * (n - 1)
    store = model.new_state(active=0) if store is None else store
    owner, rows_before, room = object(), store.rows, store.capacity
    row = store.borrow(owner, 1, window, adapter)
    try:
        for begin, end, first in windows(n, window, stride):
            store.truncate(row, 0)
            for start in range(begin, end, chunk):
                stop = min(start + chunk, end)
                logits = model.forward(store, ids[None, start:stop], row=row)[0]  # [seq, vocab]: position p predicts token p + 1
                # predictions for targets t in [max(start + 1, first), min(stop + 1, end))
                lo, hi = max(start + 1, first), min(stop + 1, end)
                if lo >= hi:
                    continue
                predicting = logits[lo - 1 - start : hi - 1 - start]  # [hi - lo, vocab]
                lp = log_softmax(predicting)
                chosen = lp[np.arange(hi - lo), ids[lo:hi]]
                logprobs[lo - 1 : hi - 1] = chosen
                argmax[lo - 1 : hi - 1] = predicting.argmax(-1)
                ranks[lo - 1 : hi - 1] = (lp > chosen[:, None]).sum(-1) + 1
                if top:
                    best[lo - 1 : hi - 1] = [top_logprobs(row_lp, top) for row_lp in lp]
            if progress:
                progress(end, n)
    finally:
        store.give_back(owner, rows_before, room)
    return Score(tuple(int(t) for t in ids), logprobs, argmax, ranks, tuple(best) if top else ())
