"""Beam search, following transformers' rules so that results match its ``generate`` token for token.

Each step, every running beam of a prompt proposes its continuations, scored by the beam's summed
log-probability plus the new token's (after the processors of ``sampling.make_processors``). The best
``keep = max(2, 1 + number of stop ids) * num_beams`` candidates are ranked:
  * a candidate among the top ``num_beams`` that ends (a stop token, or the length budget) joins the
    finished hypotheses with score sum_logprobs / generated_length ** length_penalty;
  * the best ``num_beams`` candidates that do not end become the next running beams.
A prompt is done when ``early_stopping`` is True and ``num_beams`` hypotheses are finished, when no
running beam can still beat the worst finished one (judged at the current length, or at the longest
possible one for ``early_stopping="never"`` with a positive length penalty), or when every candidate
ends. Scores are float32, as in transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence as Seq

import numpy as np

from .config import GenerationConfig
from .model import LoadedModel
from .sampling import Processor, log_softmax, make_processors, run_processors
from .state_store import StateStore

_NEG = np.float32(-1e9)  # transformers' "impossible" score, added rather than set


@dataclass
class Hypothesis:
    """A finished beam: generated tokens (without the stop token), its length-normalised score and
    why it ended ("stop" or "length")."""

    tokens: list[int]
    score: float
    finish_reason: str


@dataclass
class _Prompt:
    """The beam state of one prompt."""

    prompt: np.ndarray  # int64 [n]
    budget: int  # new tokens allowed
    processors: list[Processor]
    beams: list[list[int]] = field(default_factory=lambda: [[]])  # running beams' tokens
    scores: np.ndarray = field(default_factory=lambda: np.zeros(1, np.float32))  # [beams] summed log-probs
    finished: list[Hypothesis] = field(default_factory=list)  # best first, at most num_beams
    improvable: bool = True
    done: bool = False


def beam_search(
    model: LoadedModel,
    store: StateStore,
    prompts: Seq[np.ndarray],
    budgets: Seq[int],
    config: GenerationConfig,
    stop_ids: frozenset[int],
) -> list[list[Hypothesis]]:
    """The ``num_return_sequences`` best hypotheses of each prompt, best first. The beams run in a
    block of rows borrowed from ``store`` for the search; the store's other rows are left as they were."""
    k = config.num_beams
    states = [_Prompt(p, b, make_processors(config, len(p), stop_ids)) for p, b in zip(prompts, budgets)]
    capacity = max(len(p) + b for p, b in zip(prompts, budgets))
    owner, rows, room = object(), store.rows, store.capacity
    start = store.borrow(owner, len(prompts) * k, capacity, model.adapter_slot(config.adapter))
    try:
        # The first step runs one row per prompt: transformers starts every beam but the first at -1e9,
        # so only the first beam's continuations can be chosen.
        logits = np.stack([model.forward(store, p[None, :], keep=1, row=start + i)[0, -1] for i, p in enumerate(prompts)])
        live = list(range(len(states)))  # prompts with rows in the block, in row order
        generated = 0
        while True:
            parents: dict[int, list[int]] = {}  # prompt -> block row each of its next beams continues
            row = 0
            for p in live:
                n = len(states[p].beams)
                parents[p] = [row + b for b in _step(states[p], logits[row : row + n], generated, k, config, stop_ids)]
                row += n
            generated += 1
            live = [p for p in live if not states[p].done]
            if not live:
                break
            store.reorder(start, [r for p in live for r in parents[p]])  # [live * k]
            new = np.array([beam[-1] for p in live for beam in states[p].beams], dtype=np.int64)  # [live * k]
            logits = model.forward(store, new[:, None], keep=1, row=start)[:, 0]  # [live * k, vocab]
    finally:
        store.give_back(owner, rows, room)
    return [s.finished[: config.num_return_sequences] for s in states]


def _step(s: _Prompt, logits: np.ndarray, generated: int, k: int, config: GenerationConfig, stop_ids) -> list[int]:
    """Advance one prompt by a token; ``logits`` [running beams, vocab]. Returns the running beam each
    of the k next beams continues."""
    vocab = logits.shape[-1]
    logp = log_softmax(logits).astype(np.float32)  # [beams, vocab]
    for b, beam in enumerate(s.beams):
        history = np.concatenate([s.prompt, np.asarray(beam, dtype=np.int64)])
        logp[b] = run_processors(s.processors, history, logp[b])
    total = (logp + s.scores[:, None]).reshape(-1)  # [beams * vocab]
    keep = max(2, 1 + len(stop_ids)) * k
    top = _top(total, keep)
    beam_of, token_of, score_of = top // vocab, top % vocab, total[top]
    length = generated + 1
    ends = np.array([t in stop_ids for t in token_of]) | (length >= s.budget)

    # Finished hypotheses: the ending candidates among the best k, while they can still matter.
    if s.improvable and not (config.early_stopping is True and len(s.finished) == k):
        norm = np.float32(length**config.length_penalty)
        for c in np.flatnonzero(ends[:k]):
            tokens = s.beams[beam_of[c]] + [int(token_of[c])]
            by_stop = int(token_of[c]) in stop_ids
            s.finished.append(Hypothesis(tokens[:-1] if by_stop else tokens, float(score_of[c] / norm), "stop" if by_stop else "length"))
        s.finished.sort(key=lambda h: -h.score)  # stable: earlier hypotheses win ties
        del s.finished[k:]

    # Running beams: the best k candidates that do not end (ending ones sink to about -1e9).
    running = score_of + ends.astype(np.float32) * _NEG
    order = _top(running, k)
    s.beams = [s.beams[beam_of[c]] + [int(token_of[c])] for c in order]
    s.scores = running[order].astype(np.float32)

    if config.early_stopping == "never" and config.length_penalty > 0:
        best_length = s.budget
    else:
        best_length = length
    if len(s.finished) == k:
        best_possible = s.scores[0] / np.float32(best_length**config.length_penalty)
        s.improvable = s.improvable and bool(best_possible > s.finished[-1].score)
    full = config.early_stopping is True and len(s.finished) == k
    s.done = not s.improvable or full or bool(ends.all())
    return [int(beam_of[c]) for c in order]


def _top(values: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` largest values, largest first; ties keep index order."""
    n = min(n, values.shape[0])
    part = np.argpartition(-values, n - 1)[:n] if n < values.shape[0] else np.arange(values.shape[0])
    return part[np.lexsort((part, -values[part]))]
