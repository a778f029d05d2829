"""The decode loop: every running sequence advances together, one model step at a time.

It serves the Generator (which drives it from the caller's thread, a step whenever a stream needs a
token) and the Engine (a thread of its own fed by a queue). Requests join and leave between steps:

  each ``step()``:
    1. cancelled requests leave, and their cache rows are freed;
    2. the scheduler admits waiting requests into free rows and names a prompt chunk to read;
    3. that chunk is run into its request's row; when its prompt is complete, each of its choices
       samples a first token and joins the decode batch;
    4. one forward pass over the decode batch gives every running choice its next token; when one
       choice runs alone and its text repeats earlier text, that pass also checks the tokens that
       followed there (prompt-lookup speculation, ``speculation.py``) and may give it several.

A choice is one sequence being generated (a request asks for ``n`` of them from one prompt). Its
next token comes from its logits through its processors, its constraint's mask when it has one
(``structured.py``: such a choice never speculates, and it ends once its output is complete) and its
sampler (``sampling``), and its stop
callback (``stopping.StopCriteria``) says when it ends; the loop itself ends it only when its token
budget is spent. Everything a request produces goes to its ``on_event`` callback as ``Event``s. Beam
search has its own loop (``beam.py``).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from .config import GenerationConfig
from .kv_cache import KVCache
from .model import OnnxCausalLM
from .sampling import Processor, Sampler, log_softmax, make_processors
from .scheduler import Scheduler
from .speculation import PromptLookup, accept

if TYPE_CHECKING:
    from .structured import Constraint

StopCallback = Callable[[int], "tuple[str, str | None]"]  # token -> (text released, finish reason or None)


@dataclass(frozen=True)
class TokenLogprob:
    """The model's log-probability of a chosen token, and the most likely alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Event:
    """Something one choice of a request produced: a token (None when it ended without one) with the
    text that became final, and its finish reason once it ended ("stop", "length", "stop_string",
    "cancelled")."""

    choice: int
    token: int | None
    text: str
    finish_reason: str | None = None
    logprob: TokenLogprob | None = None


@dataclass(eq=False)
class Choice:
    """One sequence being generated: its row in the cache is looked up by the choice itself."""

    request: "Request"
    index: int
    sampler: Sampler
    processors: list[Processor]
    stop: StopCallback
    drafter: PromptLookup | None = None  # proposes tokens to check, when speculation is on for it
    constraint: "Constraint | None" = None  # masks the logits to what the request's constraint allows
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    pending: int = -1  # the newest token, sampled but not yet run through the model
    _history: np.ndarray = field(init=False, repr=False)  # prompt + tokens, preallocated

    def __post_init__(self) -> None:
        prompt = self.request.prompt
        self._history = np.empty(prompt.shape[0] + self.request.budget, dtype=np.int64)
        self._history[: prompt.shape[0]] = prompt

    @property
    def history(self) -> np.ndarray:
        """int64 [prompt + generated]: a view."""
        return self._history[: self.request.prompt.shape[0] + len(self.tokens)]


class Request:
    """A prompt to complete ``n`` times (``config.num_return_sequences``), at most ``budget`` new
    tokens each. ``stop_callback()`` makes a fresh stop callback per choice; ``on_event`` receives the
    output (from the loop's thread), or without one it collects in ``events``. ``logprobs``: None, or
    how many alternatives to report with each token's log-probability. ``speculate``: its choices
    propose tokens to check while they run alone (not with a ``constraint``: a maker of each choice's
    ``structured.Constraint``). ``cancel()`` may be called from any thread."""

    def __init__(
        self,
        prompt_ids,
        config: GenerationConfig,
        budget: int,
        stop_ids: frozenset[int],
        stop_callback: Callable[[], StopCallback],
        on_event: Callable[[Event], None] | None = None,
        logprobs: int | None = None,
        speculate: bool = False,
        constraint: "Callable[[], Constraint] | None" = None,
    ):
        self.prompt = np.asarray(prompt_ids, dtype=np.int64)
        self.config = config
        self.budget = budget
        self.events: deque[Event] = deque()
        self.on_event = on_event or self.events.append
        self.logprobs = logprobs
        self.prefilled = 0  # prompt positions in the cache
        self.cached_tokens = 0  # of those, how many an earlier sequence had left there
        self.cancelled = False
        self.error: Exception | None = None  # what ended it, when its own processors or callbacks failed
        self.done = False
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        processors = make_processors(config, self.prompt.shape[0], stop_ids)
        seeds = np.random.SeedSequence(config.seed).spawn(config.num_return_sequences)
        self.choices = [
            Choice(self, i, Sampler(config, np.random.default_rng(s)), processors, stop_callback(),
                   PromptLookup() if speculate and constraint is None else None,
                   constraint() if constraint is not None else None)
            for i, s in enumerate(seeds)
        ]  # fmt: skip

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class LoopStats:
    """Counters since the loop started (the server's /metrics)."""

    prompt_tokens: int = 0  # prompt tokens run through the model
    cached_prompt_tokens: int = 0  # prompt tokens found in the cache instead
    prompt_seconds: float = 0.0  # time spent reading prompts
    generated_tokens: int = 0
    decode_seconds: float = 0.0  # time spent in decode steps
    decode_steps: int = 0
    decoded_rows: int = 0  # rows summed over decode steps (their mean is the busy slots per step)
    proposed_tokens: int = 0  # speculation: tokens proposed for checking
    accepted_tokens: int = 0  # of those, accepted
    requests_finished: int = 0


class DecodeLoop:
    """Owns a cache and steps the requests submitted to it. Not thread-safe: one caller at a time
    (the Generator holds a lock; the Engine calls it from its own thread only)."""

    def __init__(self, model: OnnxCausalLM, cache: KVCache, prefill_chunk: int = 512, max_waiting: int | None = None):
        self.model = model
        self.cache = cache
        self.scheduler = Scheduler(cache, prefill_chunk, max_waiting)
        self.requests: list[Request] = []
        self.stats = LoopStats()

    def submit(self, request: Request) -> None:
        if request.prompt.shape[0] + request.budget > self.cache.capacity:
            raise ValueError(
                f"the prompt ({request.prompt.shape[0]} tokens) and max_new_tokens ({request.budget}) need "
                f"{request.prompt.shape[0] + request.budget} positions, more than a cache row holds ({self.cache.capacity})"
            )
        self.scheduler.submit(request)
        self.requests.append(request)

    @property
    def busy(self) -> bool:
        return bool(self.requests)

    def step(self) -> None:
        """One round: drop cancelled requests, read one prompt chunk, run one decode step."""
        for request in [r for r in self.requests if r.cancelled]:
            self._end(request, "cancelled")
        self.scheduler.admit()
        chunk = self.scheduler.next_chunk()
        if chunk is not None:
            began = time.perf_counter()
            self._prefill(*chunk)
            self.stats.prompt_seconds += time.perf_counter() - began
        if self.cache.active:
            began = time.perf_counter()
            self.stats.decode_steps += 1
            self.stats.decoded_rows += self.cache.active
            self._decode()
            self.stats.decode_seconds += time.perf_counter() - began

    def _prefill(self, request: Request, start: int, stop: int) -> None:
        first = request.choices[0]
        row = self.cache.row_of(first)
        if start == request.cached_tokens:
            self.stats.cached_prompt_tokens += start
        logits = self.model.forward(request.prompt[None, start:stop], keep=1, row=row, cache=self.cache)[0, -1]
        self.stats.prompt_tokens += stop - start
        request.prefilled = stop
        if stop < request.prompt.shape[0]:
            return
        self.scheduler.prefilled(request)
        for choice in request.choices[1:]:
            self.cache.copy_row(row, self.cache.row_of(choice))
        events = [(choice, self._next_token(choice, logits)) for choice in request.choices]
        for choice, event in events:
            if event.finish_reason is None:
                self.cache.activate(choice)
            else:
                self.cache.release(choice)
        self._publish(events)
        self._settle(request)

    def _decode(self) -> None:
        batch = list(self.cache.owners())
        crossing = [c for c in batch if self.model.crosses_switch(int(self.cache.lengths[self.cache.row_of(c)]), 1)]
        if crossing:  # LongRoPE: these rows are fed again from their start, one by one; the rest wait a step
            return self._refeed(crossing)
        if len(batch) == 1 and batch[0].drafter is not None:  # alone: speculation costs no one else a thing
            choice = batch[0]
            room = choice.request.budget - len(choice.tokens) - 1
            length, switch = int(self.cache.lengths[self.cache.row_of(choice)]), self.model.rotary_switch_after
            if length < switch:
                room = min(room, switch - length - 1)  # a draft never carries a row past the switch
            draft = choice.drafter.propose(choice.history, room)
            if draft.size:
                return self._check_draft(choice, draft)
        tokens = np.fromiter((c.pending for c in batch), dtype=np.int64, count=len(batch))
        logits = self.model.forward(tokens[:, None], keep=1, cache=self.cache)[:, 0]
        events = [(c, self._next_token(c, logits[row])) for row, c in enumerate(batch)]
        ended = [c for c, event in events if event.finish_reason is not None]
        for choice in ended:
            self.cache.release(choice)
        self._publish(events)
        for request in {c.request: None for c in ended}:
            self._settle(request)

    def _refeed(self, choices: list[Choice]) -> None:
        for choice in choices:
            row = self.cache.row_of(choice)
            logits = self.model.forward(np.array([[choice.pending]]), keep=1, row=row, cache=self.cache)[0, -1]
            event = self._next_token(choice, logits)
            if event.finish_reason is not None:
                self.cache.release(choice)
            self._publish([(choice, event)])
            if event.finish_reason is not None:
                self._settle(choice.request)

    def _check_draft(self, choice: Choice, draft: np.ndarray) -> None:
        """Run ``choice``'s newest token and the proposed ``draft`` in one pass, then take tokens
        position by position while they match the proposal; the row keeps only what was taken."""
        row = self.cache.row_of(choice)
        before = int(self.cache.lengths[row])
        ids = np.concatenate([[choice.pending], draft])[None, :]
        logits = self.model.forward(ids, keep=ids.shape[1], cache=self.cache)[0]  # [1 + k, vocab]
        events, taken = [], 0
        for i in range(ids.shape[1]):
            proposed = int(draft[i]) if i < draft.shape[0] else None
            event = self._next_token(choice, logits[i], proposed)
            events.append((choice, event))
            if event.finish_reason is not None or proposed is None or event.token != proposed:
                break
            taken += 1
        choice.drafter.update(draft.shape[0], taken)
        self.stats.proposed_tokens += draft.shape[0]
        self.stats.accepted_tokens += taken
        self.cache.truncate(row, before + 1 + taken)  # the newest token and the proposed ones taken
        if events[-1][1].finish_reason is not None:
            self.cache.release(choice)
        self._publish(events)
        if events[-1][1].finish_reason is not None:
            self._settle(choice.request)

    def _next_token(self, choice: Choice, logits: np.ndarray, proposed: int | None = None) -> Event:
        """Choose ``choice``'s next token from its ``logits`` [vocab]; the event says it, and why the
        choice ended if it did. A failure of the request's own code (a processor, the stop callback)
        ends the request, not the loop. Ended choices free their rows before their events go out, so
        a consumer that hears of the end finds the slot free. With ``proposed``, the token is chosen
        by speculation's acceptance rule, which keeps the distribution the sampler's."""
        request = choice.request
        constraint = choice.constraint
        try:
            if constraint is not None and constraint.complete:  # nothing may follow: it ends as a stop token ends it
                text, reason = choice.stop.finish("stop")
                return Event(choice.index, None, text, reason)
            processed = logits
            for fn in choice.processors:
                processed = fn(choice.history, processed)
            if constraint is not None:
                processed = constraint.mask(processed)
            token = choice.sampler(processed) if proposed is None else accept(choice.sampler, processed, proposed)[0]
            text, reason = choice.stop(token)
            if constraint is not None and reason != "stop":
                constraint.advance(token)
        except Exception as e:  # noqa: BLE001 - handed to the request's consumer
            request.error = e
            return Event(choice.index, None, "", "error")
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        if reason == "stop":  # a stop token is not part of the output
            return Event(choice.index, None, text, reason)
        choice._history[request.prompt.shape[0] + len(choice.tokens)] = token
        choice.tokens.append(token)
        choice.pending = token
        self.stats.generated_tokens += 1
        logprob = _logprob(logits, token, request.logprobs) if request.logprobs is not None else None
        if reason is None and constraint is not None and constraint.complete:  # only a stop token may follow
            more, reason = choice.stop.finish("stop")
            text += more
        if reason is None and len(choice.tokens) >= request.budget:
            more, reason = choice.stop.finish("length")
            text += more
        return Event(choice.index, token, text, reason, logprob)

    def _publish(self, events: list[tuple[Choice, Event]]) -> None:
        for choice, event in events:
            self._emit(choice, event)

    def _emit(self, choice: Choice, event: Event) -> None:
        if event.finish_reason is not None:
            choice.finish_reason = event.finish_reason
        choice.request.on_event(event)

    def _settle(self, request: Request) -> None:
        """After some of ``request``'s choices ended: end it all if it failed, retire it if done."""
        if request.error is not None:
            self._end(request, "error")
        else:
            self._finish_if_done(request)

    def _finish_if_done(self, request: Request) -> None:
        if not request.done and all(c.finish_reason is not None for c in request.choices):
            request.done = True
            self.requests.remove(request)
            self.stats.requests_finished += 1

    def fail(self, request: Request, error: Exception) -> None:
        """End ``request`` because of ``error`` (its consumer finds it in ``request.error``)."""
        request.error = error
        self._end(request, "error")

    def _end(self, request: Request, reason: str) -> None:
        """End every unfinished choice of ``request`` now and free its rows."""
        self.scheduler.forget(request)
        for choice in request.choices:
            if choice.finish_reason is None:
                if self.cache.owns(choice):
                    self.cache.release(choice)
                self._emit(choice, Event(choice.index, None, "", reason))
        self._finish_if_done(request)


def _logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    logp = log_softmax(logits)
    best = ()
    if top > 0:
        ids = np.argpartition(-logp, top - 1)[:top]
        ids = ids[np.argsort(-logp[ids], kind="stable")]
        best = tuple((int(i), float(logp[i])) for i in ids)
    return TokenLogprob(int(token), float(logp[token]), best)
