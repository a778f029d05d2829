"""Logits processors and the sampler, in pure numpy.

A request's GenerationConfig is turned once into a list of processors (``make_processors``) and a
sampler (``Sampler``). A processor is any callable ``(token_ids, logits) -> logits``: token_ids int64
[n] are the prompt and the tokens generated so far, logits float32 [vocab] one sequence's scores.
The built-in ones (repetition, presence and frequency penalties, no-repeat n-grams,
min_new_tokens) are made here as closures of that kind, and a user's processors are appended to the
same list. The sampler turns processed logits into a token: greedy, or temperature, top-k, top-p and
min-p then a draw from an explicit ``np.random.Generator``. The order follows transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    from .config import GenerationConfig

NEG_INF = -np.inf
Processor = Callable[[np.ndarray, np.ndarray], np.ndarray]


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


def apply_presence_frequency(logits: np.ndarray, generated: np.ndarray, presence: float, frequency: float) -> np.ndarray:
    """OpenAI's penalties over the generated tokens: ``presence`` once for every token that occurred,
    ``frequency`` times the number of its occurrences."""
    if (presence == 0.0 and frequency == 0.0) or generated.size == 0:
        return logits
    ids, counts = np.unique(generated, return_counts=True)
    ok = ids < logits.shape[-1]
    out = logits.copy()
    out[ids[ok]] -= np.float32(presence) + np.float32(frequency) * counts[ok].astype(np.float32)
    return out


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


def _user_processor(fn: Processor) -> Processor:
    """Run a user's callable on copies, and check what it returns."""

    def processor(token_ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        out = np.asarray(fn(token_ids.copy(), logits.copy()))
        if out.shape != logits.shape:
            name = getattr(fn, "__name__", type(fn).__name__)
            raise ValueError(f"logits processor {name} returned shape {out.shape}, expected {logits.shape}")
        return out.astype(np.float32, copy=False)

    return processor


def make_processors(config: "GenerationConfig", prompt_length: int, stop_ids: frozenset[int]) -> list[Processor]:
    """The processors ``config`` asks for, for a sequence whose first ``prompt_length`` ids are its
    prompt, in the order they run; empty for plain greedy decoding or sampling."""
    out: list[Processor] = []
    if config.repetition_penalty != 1.0:
        out.append(lambda ids, logits: apply_repetition_penalty(logits, ids, config.repetition_penalty))
    if config.presence_penalty != 0.0 or config.frequency_penalty != 0.0:
        out.append(
            lambda ids, logits: apply_presence_frequency(
                logits, ids[prompt_length:], config.presence_penalty, config.frequency_penalty
            )
        )
    if config.no_repeat_ngram_size > 0:
        out.append(lambda ids, logits: apply_no_repeat_ngram(logits, ids, config.no_repeat_ngram_size))
    if config.min_new_tokens > 0 and stop_ids:
        out.append(
            lambda ids, logits: apply_min_new_tokens(logits, ids.shape[0] - prompt_length, config.min_new_tokens, stop_ids)
        )
    out.extend(_user_processor(fn) for fn in config.logits_processors)
    return out


def run_processors(processors: list[Processor], token_ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float32, copy=False)
    for fn in processors:
        logits = fn(token_ids, logits)
    return logits


class Sampler:
    """Processed logits → the next token id: the argmax when the temperature is 0, otherwise a draw
    from the warped distribution (temperature, top-k, top-p, min-p) with ``rng``."""

    def __init__(self, config: "GenerationConfig", rng: np.random.Generator | None = None):
        self.config = config
        self.greedy = config.temperature == 0.0
        self.rng = rng if rng is not None else np.random.default_rng()

    def warp(self, logits: np.ndarray) -> np.ndarray:
        c = self.config
        logits = apply_temperature(logits, c.temperature)
        return apply_min_p(apply_top_p(apply_top_k(logits, c.top_k), c.top_p), c.min_p)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """float64 [vocab]: the distribution the next token is drawn from (one-hot when greedy)."""
        if self.greedy:
            out = np.zeros(logits.shape[-1])
            out[np.argmax(logits)] = 1.0
            return out
        return softmax(self.warp(logits))

    def __call__(self, logits: np.ndarray) -> int:
        if self.greedy:
            return int(np.argmax(logits))
        return draw(self.probabilities(logits), self.rng)


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    return int(rng.choice(probs.shape[-1], p=probs))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - np.max(logits)
    e = np.exp(z)
    return e / e.sum()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def top_logprobs(logp: np.ndarray, k: int) -> tuple[tuple[int, float], ...]:
    """The ``k`` likeliest (token id, log-probability) of ``logp`` float [vocab], likeliest first
    (ties in id order)."""
    if k <= 0:
        return ()
    ids = np.argpartition(-logp, k - 1)[:k]
    ids = ids[np.lexsort((ids, -logp[ids]))]
    return tuple((int(i), float(logp[i])) for i in ids)
