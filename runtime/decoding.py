"""The decode loop for greedy decoding and sampling: one forward step per new token, for a batch of
sequences at once. Beam search has its own loop in ``beam.py``.

Prompts of different lengths are padded on the left; the attention mask hides the padding and the
position ids count only real tokens, so each row computes what it would compute alone. A row that
finishes leaves the batch (its cache row is dropped), so the others do not pay for it.
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
    history: np.ndarray = field(init=False)  # int64 [n + generated]: prompt and tokens so far

    def __post_init__(self) -> None:
        self.history = self.prompt

    def append(self, token: int) -> None:
        self.tokens.append(token)
        self.history = np.append(self.history, token)
        if len(self.tokens) >= self.budget:
            self.finish_reason = "length"


def left_pad(prompts: Seq[np.ndarray], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """input_ids, attention_mask and position_ids, each int64 [batch, longest], for prompts padded
    on the left; padding gets position 0 and mask 0."""
    longest = max(p.shape[0] for p in prompts)
    ids = np.full((len(prompts), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), longest), dtype=np.int64)
    for row, p in enumerate(prompts):
        ids[row, longest - p.shape[0] :] = p
        mask[row, longest - p.shape[0] :] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, positions


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
    ids, mask, positions = left_pad(prompts)
    model.reset(batch=len(prompts))
    logits = model.forward(ids, mask, positions)[:, -1]  # [prompts, vocab]: prefill, last position only
    rows = np.repeat(np.arange(len(prompts)), copies)  # prompt row behind each sequence
    if copies > 1:
        model.cache.select(rows)
        logits = logits[rows]
    mask, position = mask[rows], positions[rows, -1]  # [batch, total], [batch]
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
            live, mask, position = live[keep], mask[keep], position[keep]
        position = position + 1
        mask = np.concatenate([mask, np.ones((len(live), 1), dtype=np.int64)], axis=1)
        new = np.array([[seqs[i].tokens[-1]] for i in live], dtype=np.int64)  # [batch, 1]
        logits = model.forward(new, mask, position[:, None])[:, -1]
