"""The engine: one thread that runs the decode loop for many requests at once (the server's driver).

Requests come from any thread (``submit``) straight into the scheduler's queue, and the engine's
thread runs the decode loop (``decode_loop.DecodeLoop``) over a state store of ``slots`` rows of
``ctx_size`` positions each, reserved once at start. Each request's output goes to its own callback,
from the engine's thread. ``cancel`` (any thread) takes a waiting request out of the queue at once and
frees a running one's rows at the next step. When more requests wait for a row than the queue holds,
``submit`` refuses at once with QueueFullError. ``score`` scores token ids (``scoring.score_ids``) on
the engine's thread too, between two steps, so scoring and decoding never run the model at once; its
state is a store of its own for the call, and the slots are left as they were. ``load_adapter`` and
``unload_adapter`` change the model's LoRA adapters there too, between two steps (``adapters.py``); an
adapter a running or waiting request uses is not unloaded. No web framework here: the HTTP server
(``lmrt.serve``) and Python callers both use this class.

    model = LoadedModel("models/smollm2")
    engine = Engine(model, slots=8, ctx_size=2048)
    request = engine.submit(engine.request(model.encode("Hi"), model.config(max_new_tokens=64), on_event=print))
    ...
    engine.close()
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .adapters import AdapterChangeError
from .config import ConfigError, GenerationConfig
from .decode_loop import DecodeLoop, LoopStats
from .engine_settings import EngineSettings
from .model import LoadedModel
from .request import Event, Request, RequestBuilder
from .scheduler import QueueFullError
from .scoring import Score, score_ids
from .state_buffers import reserved_bytes


@dataclass(frozen=True)
class EngineStatus:
    """A snapshot of the engine's gauges and its decode loop's counters (the server's /metrics)."""

    slots: int
    ctx_size: int
    slots_in_use: int
    cached_positions: int  # positions held by all rows, free ones included
    requests_processing: int
    requests_waiting: int
    state_bytes: int  # decoding state reserved at start (a KV cache, recurrent state and its snapshots)
    stats: LoopStats


class Engine:
    """``Engine(model, settings)`` or ``Engine(model, slots=..., ctx_size=..., ...)``: the settings'
    fields as keywords, over EngineSettings' defaults."""

    def __init__(self, model: LoadedModel, settings: EngineSettings | None = None, **overrides):
        settings = dataclasses.replace(settings or EngineSettings(), **overrides)
        self.model = model
        self.settings = settings
        self.slots, self.max_queue = settings.slots, settings.max_queue
        self.ctx_size = settings.resolved_ctx_size(model.context_length)
        self.state_bytes = reserved_bytes(model.state_specs, self.slots, self.ctx_size)
        self._requests = RequestBuilder(model, self.ctx_size, "a slot holds", cap_budget=False)
        self._loop = DecodeLoop(model, model.new_state(self.slots, self.ctx_size, active=0), settings.prefill_chunk, settings.max_queue)
        self._wake = threading.Event()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # (work, future) to run between steps
        self._closing = False
        self._adapter_lock = threading.Lock()  # a request's adapter is still held when it is queued
        self._thread = threading.Thread(target=self._run, name="lmrt-engine", daemon=True)
        self._thread.start()

    # --- any thread --------------------------------------------------------------------------

    def request(
        self, prompt_ids: list[int], config: GenerationConfig, on_event: Callable[[Event], None], logprobs: int | None = None
    ) -> Request:
        """A request for ``prompt_ids`` checked against a slot's context: the prompt must leave room
        for at least one new token, and prompt + max_new_tokens must fit."""
        if config.num_beams > 1:
            raise ValueError("beam search is not served by the engine; use num_beams 1")
        if config.num_return_sequences > self.slots:
            raise ValueError(f"num_return_sequences {config.num_return_sequences} is more than the server's {self.slots} slots")
        return self._requests.build(prompt_ids, config, on_event, logprobs)

    def submit(self, request: Request) -> Request:
        """Queue ``request``; raises QueueFullError when ``max_queue`` requests already wait."""
        if self._closing:
            raise RuntimeError("the engine is shut down")
        with self._adapter_lock:
            # the adapter it was built with may have been unloaded since (ConfigError), or loaded again elsewhere
            if request.adapter and self.model.adapter_slot(request.config.adapter) != request.adapter:
                raise ConfigError("adapter", f"{request.config.adapter!r} was unloaded and loaded again since the request was built")
            self._loop.submit(request)
        self._wake.set()
        return request

    def cancel(self, request: Request) -> None:
        self._loop.cancel(request)
        self._wake.set()

    def score(self, token_ids: Sequence[int], top: int = 0, adapter: str | None = None) -> "Future[Score]":
        """A future of ``token_ids``' Score (``top``: with the likeliest tokens at each position;
        ``adapter``: the model's LoRA adapter to score with, None for the base model),
        computed on the engine's thread between two steps, in one window as long as the ids (at
        most a slot's context). A single token has nothing to score: its Score is empty at once.
        Cancelling the future before it starts skips it."""
        ids = list(token_ids)
        self.model.adapter_slot(adapter)  # a name not held: refused now
        if len(ids) > self.ctx_size:
            raise ValueError(f"scoring {len(ids)} tokens needs more positions than a slot holds ({self.ctx_size})")
        if self._closing:
            raise RuntimeError("the engine is shut down")
        future: Future = Future()
        if len(ids) == 1:
            future.set_result(Score((int(ids[0]),), np.empty(0), np.empty(0, np.int64), np.empty(0, np.int64)))
            return future
        # the slot is looked up again on the engine's thread: the adapter may have been unloaded since
        work = lambda: score_ids(self.model, ids, window=len(ids), top=top, adapter=self.model.adapter_slot(adapter))  # noqa: E731
        self._jobs.put((work, future))
        self._wake.set()
        return future

    def load_adapter(self, name: str, matrices: dict[str, np.ndarray], scale: float, most: int | None = None) -> "Future[int]":
        """A future of the slot of LoRA adapter ``name`` (``adapters.read_adapter``'s matrices, B to
        be multiplied by ``scale``), held from the engine's next step on; AdapterChangeError when a
        model holds ``name`` already or ``most`` adapters. ValueError for a model without LoRA inputs."""
        bank = self._bank()

        def load() -> int:
            if most is not None and len(bank.names) >= most:
                raise AdapterChangeError(f"{len(bank.names)} adapters are loaded, the most this server holds: unload one first", "full")
            store = self._loop.store
            with self._adapter_lock:
                return bank.add(name, matrices, scale, set(store.adapter_slots(0, store.rows).tolist()))

        return self._job(load)

    def unload_adapter(self, name: str) -> "Future[int]":
        """A future of the slot LoRA adapter ``name`` had, no longer held from the engine's next step
        on; AdapterChangeError for a name not held, or one a running or waiting request uses."""
        bank = self._bank()

        def unload() -> int:
            with self._adapter_lock:
                slot = bank.slot(name) if name in bank.names else None
                users = [r for r in self._loop.running + self._loop.scheduler.queued() if slot and r.adapter == slot]
                if users:
                    raise AdapterChangeError(f"the adapter '{name}' is used by {len(users)} running or waiting requests; "
                                             "unload it once they end", "in_use")  # fmt: skip
                return bank.remove(name)

        return self._job(unload)

    def _bank(self):
        if self.model.adapters is None:
            raise ValueError("this model's graph takes no LoRA adapters")
        return self.model.adapters

    def _job(self, work: Callable[[], object]) -> Future:
        """A future of ``work()``, run on the engine's thread between two steps."""
        if self._closing:
            raise RuntimeError("the engine is shut down")
        future: Future = Future()
        self._jobs.put((work, future))
        self._wake.set()
        return future

    def waiting(self) -> int:
        """Requests not yet given a slot."""
        return self._loop.scheduler.waiting()

    def status(self) -> EngineStatus:
        loop = self._loop
        return EngineStatus(
            slots=self.slots,
            ctx_size=self.ctx_size,
            slots_in_use=self.slots - loop.store.free_rows(),
            cached_positions=int(loop.store.lengths.sum()),
            requests_processing=len(loop.running),
            requests_waiting=self.waiting(),
            state_bytes=self.state_bytes,
            stats=dataclasses.replace(loop.stats, adapter_requests=dict(loop.stats.adapter_requests)),
        )

    def close(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; requests still running end with finish reason "cancelled"."""
        self._closing = True
        for request in list(self._loop.running) + self._loop.scheduler.drop_all():
            request.cancel()
        while not self._jobs.empty():
            _, future = self._jobs.get()
            future.cancel()
        self._wake.set()
        self._thread.join(timeout)

    # --- the engine's thread -----------------------------------------------------------------

    def _run(self) -> None:
        loop = self._loop
        while True:
            if not self._jobs.empty():
                self._run_job(*self._jobs.get())
            if not loop.busy:
                if self._closing:
                    return
                if self._jobs.empty():
                    self._wake.wait()
                    self._wake.clear()
                continue
            try:
                loop.step()
            except Exception as e:  # noqa: BLE001 - a model failure ends the running requests, not the server
                loop.fail_all(e)

    @staticmethod
    def _run_job(work: Callable[[], object], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(work())
        except Exception as e:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(e)


__all__ = ["Engine", "EngineStatus", "QueueFullError"]
