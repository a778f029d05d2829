"""The decode loop for greedy decoding and sampling: one forward step per new token, for a batch of
sequences at once. Beam search has its own loop in ``beam.py``.

Each prompt is prefilled into its own cache row; rows of different lengths then step together (the
cache tracks each row's length, so no padding is ever computed). A row that finishes leaves the batch
(its cache row is dropped), so the others do not pay for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence as Seq

import numpy as np

from .config import GenerationConfig
from .model import OnnxCausalLM
from .sampling import choose


@dataclass
class Sequence:
    """One sequence being generated. A consumer of ``decode`` may end it early by setting
    ``finish_reason`` (as the stop-string check does); it then leaves the batch."""

    prompt: np.ndarray  # int64 [n]
    budget: int  # new tokens allowed
    rng: np.random.Generator
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "stop_string"
    _history: np.ndarray = field(init=False)  # int64 [n + budget], filled as tokens come

    def __post_init__(self) -> None:
        self._history = np.empty(self.prompt.shape[0] + self.budget, dtype=np.int64)
        self._history[: self.prompt.shape[0]] = self.prompt

    @property
    def history(self) -> np.ndarray:
        """int64 [n + generated]: prompt and tokens so far (a view)."""
        return self._history[: self.prompt.shape[0] + len(self.tokens)]

    def append(self, token: int) -> None:
        self._history[self.prompt.shape[0] + len(self.tokens)] = token
        self.tokens.append(token)
        if len(self.tokens) >= self.budget:
            self.finish_reason = "length"


def decode(
    model: OnnxCausalLM,
    seqs: Seq[Sequence],
    copies: int,
    config: GenerationConfig,
    stop_ids: frozenset[int],
) -> Iterator[tuple[int, int]]:
    """Generate for all ``seqs`` together, yielding (index into seqs, token id) as tokens come.

    ``seqs`` is prompt-major: ``seqs[p * copies + j]`` is copy j of prompt p (num_return_sequences
    samples). Each prompt is prefilled once and its cache rows copied. Stop tokens are not yielded.
    """
    prompts = [seqs[i].prompt for i in range(0, len(seqs), copies)]
    capacity = max(s.prompt.shape[0] + s.budget for s in seqs)
    logits = model.prefill(prompts, capacity)  # [prompts, vocab]: each prompt's last position
    if copies > 1:
        rows = np.repeat(np.arange(len(prompts)), copies)  # prompt row behind each sequence
        model.cache.select(rows)
        logits = logits[rows]
    live = np.arange(len(seqs))  # the sequence in each cache row
    while True:
        for row, i in enumerate(live):
            s = seqs[i]
            token = choose(logits[row], s.history, len(s.tokens), config, stop_ids, s.rng)
            if token in stop_ids:
                s.finish_reason = "stop"
                continue
            s.append(token)
            yield int(i), token
        keep = [row for row, i in enumerate(live) if seqs[i].finish_reason is None]
        if not keep:
            return
        if len(keep) < len(live):
            model.cache.select(keep)
            live = live[keep]
        new = np.array([seqs[i].tokens[-1] for i in live], dtype=np.int64)  # [batch]
        logits = model.step(new)  # [batch, vocab]
