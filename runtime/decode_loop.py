"""The decode loop: every running sequence advances together, one model step at a time.

It serves the Generator (which drives it from the caller's thread, a step whenever a stream needs a
token) and the Engine (a thread of its own fed by a queue). Requests join and leave between steps:

  each ``step()``:
    1. cancelled requests leave, and their state rows are freed;
    2. the scheduler (``scheduler.py``) admits waiting requests into free rows, the one place
       admission happens, and names a prompt chunk to read;
    3. that chunk is run into its request's row; when its prompt is complete, each of its choices
       samples a first token and joins the decode batch;
    4. one forward pass over the decode batch gives every running choice its next token; when a
       choice's text repeats earlier text, a pass may also check the tokens that followed there
       (prompt-lookup speculation, ``speculation.py``) and give it several: the step's own pass
       when the choice runs alone, a pass of its own after the batch's step when that pays.

A choice is one sequence being generated (a request asks for ``n`` of them from one prompt). Its
next token comes from its logits through its processors, its constraint's mask when it has one
(``structured.py``: such a choice never speculates, and it ends once its output is complete) and its
sampler (``sampling.py``), and its stop callback (``stopping.StopCriteria``) says when it ends; the loop itself ends it only when its token
budget is spent. Everything a request produces goes to its ``on_event`` callback as ``Event``s
(``request.py``). Beam search has its own loop (``beam.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .engine_settings import PREFILL_CHUNK
from .model import LoadedModel
from .request import Choice, Event, Request, TokenLogprob
from .sampling import log_softmax, top_logprobs
from .scheduler import Scheduler
from .speculation import StepCosts, accept, check_beside_a_batch
from .state_store import StateStore


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
    adapter_requests: dict[str, int] = field(default_factory=dict)  # of those, per LoRA adapter


class DecodeLoop:
    """Steps the requests submitted to it over the rows of one state store. ``submit`` may be called
    from any thread (the scheduler's queue is the boundary); ``step`` from one thread at a time (the
    Generator holds a lock; the Engine calls it from its own thread only)."""

    def __init__(self, model: LoadedModel, store: StateStore, prefill_chunk: int = PREFILL_CHUNK, max_waiting: int | None = None):
        self.model = model
        self.store = store
        self.scheduler = Scheduler(store, prefill_chunk, max_waiting)
        self.running: list[Request] = []  # admitted and not yet done
        self.stats = LoopStats()
        self.costs = StepCosts()  # seconds per pass by positions, for speculation beside a batch

    def submit(self, request: Request) -> None:
        """Queue ``request`` (QueueFullError past the scheduler's limit)."""
        self.scheduler.submit(request)

    def cancel(self, request: Request) -> None:
        """Cancel ``request`` (any thread): a waiting one leaves the queue now, a running one frees its
        rows at the next step."""
        request.cancel()
        self.scheduler.cancel(request)

    @property
    def busy(self) -> bool:
        return bool(self.running) or self.scheduler.waiting() > 0 or self.scheduler.has_dropped()

    def step(self) -> None:
        """One round: end cancelled requests, admit waiting ones, read one prompt chunk, run one
        decode step."""
        for request in self.scheduler.take_dropped():
            self._end(request, "cancelled")
        for request in [r for r in self.running if r.cancelled]:
            self._end(request, "cancelled")
        self.running += self.scheduler.admit()
        chunk = self.scheduler.next_chunk()
        if chunk is not None:
            began = time.perf_counter()
            self._prefill(*chunk)
            self.stats.prompt_seconds += time.perf_counter() - began
        if self.store.active:
            began = time.perf_counter()
            self.stats.decode_steps += 1
            self.stats.decoded_rows += self.store.active
            self._decode()
            self.stats.decode_seconds += time.perf_counter() - began

    def fail_all(self, error: Exception) -> None:
        """End every request, running or waiting, because of ``error`` (a model failure)."""
        for request in list(self.running) + self.scheduler.drain():
            self.fail(request, error)

    def _prefill(self, request: Request, start: int, stop: int) -> None:
        first = request.choices[0]
        row = self.store.row_of(first)
        if start == request.cached_tokens:
            self.stats.cached_prompt_tokens += start
        logits = self._timed_forward(request.prompt[None, start:stop], 1, row)[0, -1]
        self.stats.prompt_tokens += stop - start
        request.prefilled = stop
        if stop < request.prompt.shape[0]:
            return
        self.scheduler.prefilled(request)
        for choice in request.choices[1:]:
            self.store.copy_row(row, self.store.row_of(choice))
        events = [(choice, self._next_token(choice, logits)) for choice in request.choices]
        for choice, event in events:
            if event.finish_reason is None:
                self.store.activate(choice)
            else:
                self.store.release(choice)
        self._publish(events)
        self._settle(request)

    def _decode(self) -> None:
        batch = list(self.store.owners())
        crossing = [c for c in batch if self.model.crosses_switch(int(self.store.lengths[self.store.row_of(c)]), 1)]
        if crossing:  # LongRoPE: these rows are fed again from their start, one by one; the rest wait a step
            return self._refeed(crossing)
        if len(batch) == 1 and batch[0].drafter is not None:  # alone: the step's own pass checks a proposal
            draft = self._propose(batch[0])
            if draft.size:
                return self._check_draft(batch[0], draft)
        tokens = np.fromiter((c.pending for c in batch), dtype=np.int64, count=len(batch))
        logits = self._timed_forward(tokens[:, None], 1)[:, 0]
        events = [(c, self._next_token(c, logits[row])) for row, c in enumerate(batch)]
        ended = [c for c, event in events if event.finish_reason is not None]
        for choice in ended:
            self.store.release(choice)
        self._publish(events)
        for request in {c.request: None for c in ended}:
            self._settle(request)
        if len(batch) > 1:  # beside the batch: a pass of its own for each proposal that pays
            for choice in [c for c in batch if c.drafter is not None and c.finish_reason is None]:
                draft = self._propose(choice)
                if draft.size and check_beside_a_batch(self.costs, choice.drafter, draft.size, len(batch)):
                    self._check_draft(choice, draft)

    def _timed_forward(self, ids: np.ndarray, keep: int, row: int | None = None) -> np.ndarray:
        """``model.forward`` over the loop's store, its seconds recorded by the positions it ran."""
        began = time.perf_counter()
        logits = self.model.forward(self.store, ids, keep=keep, row=row)
        self.costs.record(ids.size, time.perf_counter() - began)
        return logits

    def _propose(self, choice: Choice) -> np.ndarray:
        """``choice``'s proposal, within its budget and before a LongRoPE switch."""
        room = choice.request.budget - len(choice.tokens) - 1
        length, switch = int(self.store.lengths[self.store.row_of(choice)]), self.model.rotary_switch_after
        if length < switch:
            room = min(room, switch - length - 1)  # a draft never carries a row past the switch
        return choice.drafter.propose(choice.history, room)

    def _refeed(self, choices: list[Choice]) -> None:
        for choice in choices:
            row = self.store.row_of(choice)
            logits = self.model.forward(self.store, np.array([[choice.pending]]), keep=1, row=row)[0, -1]
            event = self._next_token(choice, logits)
            if event.finish_reason is not None:
                self.store.release(choice)
            self._publish([(choice, event)])
            if event.finish_reason is not None:
                self._settle(choice.request)

    def _check_draft(self, choice: Choice, draft: np.ndarray) -> None:
        """Run ``choice``'s newest token and the proposed ``draft`` in one pass, then take tokens
        position by position while they match the proposal; the row keeps only what was taken."""
        row = self.store.row_of(choice)
        before = int(self.store.lengths[row])
        ids = np.concatenate([[choice.pending], draft])[None, :]
        logits = self._timed_forward(ids, ids.shape[1], row)[0]  # [1 + k, vocab]
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
        self.store.truncate(row, before + 1 + taken)  # the newest token and the proposed ones taken
        if events[-1][1].finish_reason is not None:
            self.store.release(choice)
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
            if constraint is not None:  # masked, and kept within reach of a complete answer in the budget left
                token = constraint.choose(choice.sampler, processed, request.budget - len(choice.tokens))
            else:
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
        choice.append(token)
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
            if request in self.running:
                self.running.remove(request)
            self.stats.requests_finished += 1
            if request.adapter:
                name = request.config.adapter
                self.stats.adapter_requests[name] = self.stats.adapter_requests.get(name, 0) + 1

    def fail(self, request: Request, error: Exception) -> None:
        """End ``request`` because of ``error`` (its consumer finds it in ``request.error``)."""
        request.error = error
        self._end(request, "error")

    def _end(self, request: Request, reason: str) -> None:
        """End every unfinished choice of ``request`` now and free its rows."""
        self.scheduler.forget(request)
        for choice in request.choices:
            if choice.finish_reason is None:
                if self.store.owns(choice):
                    self.store.release(choice)
                self._emit(choice, Event(choice.index, None, "", reason))
        self._finish_if_done(request)


def _logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    logp = log_softmax(logits)
    return TokenLogprob(int(token), float(logp[token]), top_logprobs(logp, top))
