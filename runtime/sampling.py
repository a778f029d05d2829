"""Sampling as pure functions over logits.

Each function takes logits of one sequence, float [vocab], and returns new logits (or a token id);
randomness comes only from an explicit ``np.random.Generator``. The order in ``sample_next`` follows
transformers: repetition penalty, temperature, top-k, top-p, then a draw.
"""

from __future__ import annotations

import numpy as np

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


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - np.max(logits)
    e = np.exp(z)
    return e / e.sum()


def greedy(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def sample_next(
    logits: np.ndarray,  # float [vocab]
    previous: np.ndarray,  # int64 [n] tokens so far, for the repetition penalty
    rng: np.random.Generator,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
) -> int:
    """The next token id: greedy when ``temperature`` is 0, otherwise a draw from the filtered
    distribution."""
    logits = apply_repetition_penalty(logits.astype(np.float32, copy=False), previous, repetition_penalty)
    if temperature == 0.0:
        return greedy(logits)
    logits = apply_top_p(apply_top_k(apply_temperature(logits, temperature), top_k), top_p)
    probs = softmax(logits)
    return int(rng.choice(probs.shape[-1], p=probs))
