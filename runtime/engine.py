"""The engine: one thread that owns the model and serves many requests at once.

Requests come from any thread (``submit``) and go through an inbox to the engine's thread, which runs
the decode loop (``decoding.DecodeLoop``) over a fixed cache of ``slots`` rows of ``ctx_size``
positions each, reserved once at start. Each request's output goes to its own callback, from the
engine's thread. ``cancel`` (any thread) frees a request's rows at the next step. When more requests
wait for a row than the queue holds, ``submit`` refuses at once with QueueFullError. No web framework
here: the HTTP server (``lmrt.serve``) and Python callers both use this class.

    engine = Engine(Generator("models/smollm2"), slots=8, ctx_size=2048)
    request = engine.submit(prompt_ids, engine.generator.config(max_new_tokens=64), on_event=print)
    ...
    engine.close()
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from dataclasses import dataclass

from .config import GenerationConfig
from .decoding import DecodeLoop, Event, LoopStats, Request
from .generator import Generator
from .kv_cache import KVCache
from .scheduler import QueueFullError


@dataclass(frozen=True)
class EngineStatus:
    """A snapshot of the engine's gauges and its decode loop's counters (the server's /metrics)."""

    slots: int
    ctx_size: int
    slots_in_use: int
    cached_positions: int  # positions held by all rows, free ones included
    requests_processing: int
    requests_waiting: int
    kv_bytes: int
    stats: LoopStats


class Engine:
    def __init__(
        self,
        generator: Generator,
        slots: int = 4,
        ctx_size: int | None = None,
        max_queue: int = 64,
        prefill_chunk: int = 256,
    ):
        if not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be a positive integer, got {slots!r}")
        ctx_size = generator.context_length if ctx_size is None else ctx_size
        if not isinstance(ctx_size, int) or not 2 <= ctx_size <= generator.context_length:
            raise ValueError(f"ctx_size must be an integer from 2 to the model's context ({generator.context_length}), got {ctx_size!r}")
        if not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        self.generator = generator
        self.slots, self.ctx_size, self.max_queue = slots, ctx_size, max_queue
        cache = generator.model.new_cache()
        cache.reset(slots, ctx_size, active=0)
        self.kv_bytes = slots * ctx_size * KVCache.bytes_per_position(generator.manifest.architecture, generator.manifest.graph.io)
        self._loop = DecodeLoop(generator.model, cache, prefill_chunk)
        self._inbox: deque[Request] = deque()
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="lmrt-engine", daemon=True)
        self._thread.start()

    # --- any thread --------------------------------------------------------------------------

    def request(
        self, prompt_ids: list[int], config: GenerationConfig, on_event, logprobs: int | None = None
    ) -> Request:
        """A request for ``prompt_ids`` checked against a slot's context: the prompt must leave room
        for at least one new token, and prompt + max_new_tokens must fit."""
        n = len(prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.ctx_size:
            raise ValueError(f"the prompt has {n} tokens but a slot holds {self.ctx_size}; shorten it")
        if n + config.max_new_tokens > self.ctx_size:
            raise ValueError(
                f"the prompt ({n} tokens) and max_new_tokens ({config.max_new_tokens}) need "
                f"{n + config.max_new_tokens} positions, more than a slot holds ({self.ctx_size})"
            )
        if config.num_beams > 1:
            raise ValueError("beam search is not served by the engine; use num_beams 1")
        if config.num_return_sequences > self.slots:
            raise ValueError(f"num_return_sequences {config.num_return_sequences} is more than the server's {self.slots} slots")
        return self.generator.request(prompt_ids, config, on_event, logprobs)

    def submit(self, request: Request) -> Request:
        """Queue ``request``; raises QueueFullError when ``max_queue`` requests already wait."""
        if self._closing:
            raise RuntimeError("the engine is shut down")
        if self.waiting() >= self.max_queue + self._free_slots():
            raise QueueFullError(f"the server is busy: {self.waiting()} requests are waiting for a slot")
        self._inbox.append(request)
        self._wake.set()
        return request

    def cancel(self, request: Request) -> None:
        request.cancel()
        self._wake.set()

    def waiting(self) -> int:
        """Requests not yet given a slot."""
        return len(self._inbox) + len(self._loop.scheduler.waiting)

    def _free_slots(self) -> int:
        return self._loop.cache.free_rows()

    def status(self) -> EngineStatus:
        loop = self._loop
        return EngineStatus(
            slots=self.slots,
            ctx_size=self.ctx_size,
            slots_in_use=self.slots - loop.cache.free_rows(),
            cached_positions=int(loop.cache.lengths.sum()),
            requests_processing=len(loop.requests) - len(loop.scheduler.waiting),
            requests_waiting=self.waiting(),
            kv_bytes=self.kv_bytes,
            stats=dataclasses.replace(loop.stats),
        )

    def close(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; requests still running end with finish reason "cancelled"."""
        self._closing = True
        for request in list(self._inbox) + list(self._loop.requests):
            request.cancel()
        self._wake.set()
        self._thread.join(timeout)

    # --- the engine's thread -----------------------------------------------------------------

    def _run(self) -> None:
        loop = self._loop
        while True:
            if not self._inbox and not loop.busy:
                if self._closing:
                    return
                self._wake.wait()
                self._wake.clear()
                continue
            while self._inbox:
                request = self._inbox.popleft()
                try:
                    loop.submit(request)
                except Exception as e:  # noqa: BLE001 - the request's consumer hears of it
                    _fail_unsubmitted(request, e)
            try:
                loop.step()
            except Exception as e:  # noqa: BLE001 - a model failure ends the running requests, not the server
                for request in list(loop.requests):
                    loop.fail(request, e)


def _fail_unsubmitted(request: Request, error: Exception) -> None:
    request.error = error
    request.done = True
    for choice in request.choices:
        choice.finish_reason = "error"
        request.on_event(Event(choice.index, None, "", "error"))


__all__ = ["Engine", "EngineStatus", "QueueFullError"]
