"""Logits processing and sampling as pure functions over logits.

Each function takes logits of one sequence, float [vocab], and returns new logits (or a token id);
randomness comes only from an explicit ``np.random.Generator``. The order follows transformers:
``process`` (repetition penalty, no-repeat n-grams, min_new_tokens, user processors) for every
strategy, then for sampling ``warp`` (temperature, top-k, top-p, min-p) and a draw.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .config import GenerationConfig

NEG_INF = -np.inf


def apply_repetition_penalty(logits: np.ndarray, previous: np.ndarray, penalty: float) -> np.ndarray:
    """Make tokens already in ``previous`` less likely: positive logits are divided by ``penalty``,
    negative ones multiplied (the CTRL paper's rule, as transformers applies it)."""
    if penalty == 1.0 or previous.size == 0:
        return logits
    out = logits.copy()
    ids = np.unique(previous)
    seen = out[ids]
    out[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return out


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    return logits if temperature == 1.0 else logits / np.float32(temperature)


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the ``k`` largest logits (ties at the threshold kept too); 0 disables."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    threshold = np.partition(logits, -k)[-k]
    return np.where(logits < threshold, NEG_INF, logits)


def apply_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability reaches ``p``; 1.0 disables."""
    if p >= 1.0:
        return logits
    order = np.argsort(logits)  # ascending, as transformers sorts
    probs = softmax(logits[order])
    cumulative = np.cumsum(probs)
    remove = cumulative <= (1.0 - p)
    remove[-1] = False  # always keep the most likely token
    out = logits.copy()
    out[order[remove]] = NEG_INF
    return out


def apply_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Keep tokens whose probability is at least ``min_p`` times the top token's; 0 disables."""
    if min_p <= 0.0:
        return logits
    probs = softmax(logits)
    remove = probs < min_p * probs.max()
    remove[np.argmax(probs)] = False
    return np.where(remove, NEG_INF, logits)


def apply_no_repeat_ngram(logits: np.ndarray, previous: np.ndarray, n: int) -> np.ndarray:
    """Ban each token that would repeat an n-gram of ``previous`` (int64 [len]); 0 disables."""
    if n <= 0 or previous.size < n:
        return logits
    windows = np.lib.stride_tricks.sliding_window_view(previous, n)  # [len - n + 1, n]
    suffix = previous[previous.size - n + 1 :]  # the n - 1 newest tokens
    banned = windows[(windows[:, :-1] == suffix).all(axis=1), -1]
    if banned.size == 0:
        return logits
    out = logits.copy()
    out[banned[banned < out.shape[-1]]] = NEG_INF
    return out


def apply_min_new_tokens(logits: np.ndarray, generated: int, minimum: int, stop_ids) -> np.ndarray:
    """Ban the stop tokens while fewer than ``minimum`` tokens have been generated."""
    if generated >= minimum or not stop_ids:
        return logits
    out = logits.copy()
    ids = np.fromiter(stop_ids, dtype=np.int64)
    out[ids[ids < out.shape[-1]]] = NEG_INF
    return out


def apply_processors(logits: np.ndarray, previous: np.ndarray, processors) -> np.ndarray:
    """Run user callables ``(token_ids, logits) -> logits`` in order, each on a copy."""
    for fn in processors:
        out = fn(previous.copy(), logits.copy())
        out = np.asarray(out)
        if out.shape != logits.shape:
            name = getattr(fn, "__name__", type(fn).__name__)
            raise ValueError(f"logits processor {name} returned shape {out.shape}, expected {logits.shape}")
        logits = out.astype(np.float32, copy=False)
    return logits


def process(
    logits: np.ndarray,  # float [vocab]
    previous: np.ndarray,  # int64 [n]: prompt and generated tokens so far
    generated: int,  # how many of them were generated
    config: "GenerationConfig",
    stop_ids: frozenset[int],
) -> np.ndarray:
    """The processors every strategy applies (greedy, sampling and beam search)."""
    logits = apply_repetition_penalty(logits.astype(np.float32, copy=False), previous, config.repetition_penalty)
    logits = apply_no_repeat_ngram(logits, previous, config.no_repeat_ngram_size)
    logits = apply_min_new_tokens(logits, generated, config.min_new_tokens, stop_ids)
    return apply_processors(logits, previous, config.logits_processors)


def warp(logits: np.ndarray, config: "GenerationConfig") -> np.ndarray:
    """The sampling filters: temperature, top-k, top-p, min-p."""
    logits = apply_temperature(logits, config.temperature)
    return apply_min_p(apply_top_p(apply_top_k(logits, config.top_k), config.top_p), config.min_p)


def choose(
    logits: np.ndarray,  # float [vocab]
    previous: np.ndarray,  # int64 [n]
    generated: int,
    config: "GenerationConfig",
    stop_ids: frozenset[int],
    rng: np.random.Generator,
) -> int:
    """The next token id: greedy when the temperature is 0, otherwise a draw."""
    logits = process(logits, previous, generated, config, stop_ids)
    if config.temperature == 0.0:
        return greedy(logits)
    return draw(warp(logits, config), rng)


def draw(logits: np.ndarray, rng: np.random.Generator) -> int:
    probs = softmax(logits)
    return int(rng.choice(probs.shape[-1], p=probs))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - np.max(logits)
    e = np.exp(z)
    return e / e.sum()


def greedy(logits: np.ndarray) -> int:
    return int(np.argmax(logits))
