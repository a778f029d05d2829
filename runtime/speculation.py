"""Prompt-lookup speculation: propose the tokens that followed an earlier occurrence of the newest
few tokens, and let one forward pass check them all.

Text grounded in its input (an answer quoting a document, an edit of a code file, a summary) often
repeats stretches of it. ``PromptLookup.propose`` finds the latest earlier place in prompt + output
where the sequence's last n tokens (n from ``max_ngram`` down to ``min_ngram``) occurred, and proposes
what followed there, up to ``k`` tokens. The decode loop then feeds the newest token and the proposal
in one pass, keeps the logits of every position, and accepts proposed tokens while the model agrees;
the positions of rejected ones are simply cut from the cache row.

Agreement is decided by ``accept``: greedy accepts a proposed token when it is the model's argmax,
so the output is exactly the output without speculation. Sampling accepts it with the model's
probability of it and otherwise draws from the model's distribution with that token removed, which
leaves every token's distribution exactly the model's (the rule of speculative sampling, with a
proposal that is certain of its token).

``k`` adapts to how proposals fare: it grows while they are accepted whole, shrinks to what was
accepted, and after several proposals in a row are rejected outright speculation pauses, for
longer each time it fails again, so text that never repeats itself pays almost nothing.

A sequence running alone checks every proposal: the extra positions of one pass cost little next to
reading the weights. Rows that share a step first take that step together; then a row whose text
repeats may check a proposal in a pass of its own (onnxruntime's attention takes several new
positions over a cache for one row at a time), while the others wait. So in a batch a proposal is
checked only when that pays: ``StepCosts`` fits the seconds of the loop's passes as a line in the
positions they run, a proposal's expected tokens come from its sequence's acceptance so far, and
its pass runs when the tokens it expects per second beat those of the batch's plain step. A request
with speculation "on" has its proposals checked in every batch.
"""

from __future__ import annotations

import numpy as np

from .sampling import Sampler


class PromptLookup:
    def __init__(
        self, max_k: int = 8, max_ngram: int = 3, min_ngram: int = 2, patience: int = 3, insist: bool = False, alone_only: bool = False
    ):
        self.max_k, self.max_ngram, self.min_ngram, self.patience = max_k, max_ngram, min_ngram, patience
        self.insist = insist  # checked in every batch, not only where it pays ("on")
        self.alone_only = alone_only  # checked only while its row runs alone (there the check is exact)
        self.k = 4
        self._misses = 0  # proposals in a row with nothing accepted
        self._pause = 0  # steps left before proposing again
        self._backoff = 8  # the next pause's length
        self.proposed = 0
        self.accepted = 0

    def propose(self, history: np.ndarray, room: int) -> np.ndarray:
        """Up to min(k, room) token ids that followed the latest earlier occurrence of the last n
        tokens of ``history`` (int64 [n]); empty when there is none or speculation is paused."""
        if self._pause > 0:
            self._pause -= 1
            return history[:0]
        k = min(self.k, room)
        if k <= 0:
            return history[:0]
        n_total = history.shape[0]
        for n in range(min(self.max_ngram, n_total - 1), self.min_ngram - 1, -1):
            tail = history[n_total - n :]
            # windows starting at 0 .. n_total - n - 1: every earlier place the tail could stand
            windows = np.lib.stride_tricks.sliding_window_view(history[: n_total - 1], n)
            hits = np.flatnonzero((windows == tail).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n  # what followed the latest occurrence
                return history[start : start + k]
        return history[:0]

    def update(self, proposed: int, accepted: int) -> None:
        """Record how a proposal of ``proposed`` tokens fared, and adapt ``k``."""
        if proposed == 0:
            return
        self.proposed += proposed
        self.accepted += accepted
        if accepted == proposed:
            self.k = min(self.max_k, self.k + 2)
            self._misses = 0
            self._backoff = 8
        elif accepted > 0:
            self.k = max(1, accepted + 1)
            self._misses = 0
        else:
            self.k = max(1, self.k // 2)
            self._misses += 1
            if self._misses >= self.patience:
                self._pause, self._backoff, self._misses = self._backoff, min(self._backoff * 2, 256), 0

    def expected_accepted(self, proposed: int) -> float:
        """Tokens a proposal of ``proposed`` is expected to have accepted: each position accepted
        with the sequence's acceptance rate so far (one of two before it has any), the proposal
        ending at its first rejection."""
        rate = (self.accepted + 1) / (self.proposed + 2)
        return rate * (1 - rate**proposed) / (1 - rate)


class StepCosts:
    """The seconds of a pass over the decode loop's rows as ``fixed + per_position * positions``,
    fitted by least squares over the passes timed so far (older ones weighing less)."""

    def __init__(self, decay: float = 0.99):
        self.decay = decay
        self._sums = np.zeros(5)  # weights, x, y, x*x, x*y

    def record(self, positions: int, seconds: float) -> None:
        self._sums = self._sums * self.decay + np.array([1.0, positions, seconds, positions * positions, positions * seconds])

    def seconds(self, positions: int) -> float | None:
        """The fitted seconds of a pass of ``positions``; None until passes of two sizes are timed."""
        n, x, y, xx, xy = self._sums
        spread = n * xx - x * x
        if n < 2 or spread <= 1e-9 * max(n * xx, 1.0):
            return None
        per_position = max((n * xy - x * y) / spread, 0.0)
        fixed = max((y - per_position * x) / n, 0.0)
        return fixed + per_position * positions


def check_beside_a_batch(costs: StepCosts, drafter: PromptLookup, proposed: int, rows: int) -> bool:
    """Whether a row of a batch of ``rows`` checks a proposal of ``proposed`` tokens in a pass of
    its own: its drafter insists, or the tokens that pass is expected to give per second (the newest
    token's and the accepted ones) beat those of the batch's plain step."""
    if drafter.insist or drafter.alone_only:
        return drafter.insist
    plain, checking = costs.seconds(rows), costs.seconds(1 + proposed)
    if plain is None or checking is None:
        return False
    return (1 + drafter.expected_accepted(proposed)) / checking > rows / plain


def accept(sampler: Sampler, logits: np.ndarray, proposed: int) -> tuple[int, bool]:
    """The token at a position where ``proposed`` was proposed, from the position's processed
    ``logits``: (token, whether it is the proposed one)."""
    if sampler.greedy:
        token = int(np.argmax(logits))
        return token, token == proposed
    probs = sampler.probabilities(logits)
    if sampler.rng.random() < probs[proposed]:
        return proposed, True
    rest = probs.copy()
    rest[proposed] = 0.0
    total = rest.sum()
    if total <= 0.0:  # the model was certain of the proposed token after all
        return proposed, True
    return int(sampler.rng.choice(rest.shape[-1], p=rest / total)), False
