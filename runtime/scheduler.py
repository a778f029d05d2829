"""The scheduler: which request the model reads next, into which state rows, and how much per step.

Requests wait in arrival order. ``submit`` may be called from any thread; with a queue limit it
refuses at once (QueueFullError) when more requests would wait than the queue holds beside the free
rows, rather than dropping anything. A cancelled request leaves the queue at once. Admission happens
here alone, once per loop step: a waiting request is admitted as soon as the store has a free row
for each of its choices; its first choice gets the free row that shares the longest prefix with its
prompt (those positions are not computed again), the others any free row. Admitted requests are
prefilled in arrival order, at most ``prefill_chunk`` prompt tokens per step, so the sequences already
decoding keep getting a token every step while a long prompt is read.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING

from .engine_settings import PREFILL_CHUNK
from .state_store import StateStore

if TYPE_CHECKING:
    from .request import Request


class QueueFullError(RuntimeError):
    """More requests are waiting than the queue may hold."""


class Scheduler:
    def __init__(self, store: StateStore, prefill_chunk: int = PREFILL_CHUNK, max_waiting: int | None = None):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive integer, got {prefill_chunk}")
        self.store = store
        self.prefill_chunk = prefill_chunk
        self.max_waiting = max_waiting
        self._lock = threading.RLock()  # guards waiting and dropped: submit and cancel come from any thread (a stream's __del__ too)
        self._waiting: deque[Request] = deque()
        self._dropped: list[Request] = []  # cancelled while waiting, for the loop to end
        self.prefilling: deque[Request] = deque()

    def submit(self, request: "Request") -> None:
        with self._lock:
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting + self.store.free_rows():
                raise QueueFullError(f"the server is busy: {len(self._waiting)} requests are waiting for a slot")
            self._waiting.append(request)

    def cancel(self, request: "Request") -> None:
        """Take a cancelled ``request`` out of the queue now, if it still waits there."""
        with self._lock:
            if request in self._waiting:
                self._waiting.remove(request)
                self._dropped.append(request)

    def waiting(self) -> int:
        """Requests not yet given rows."""
        return len(self._waiting)

    def queued(self) -> list["Request"]:
        """The requests waiting for rows, in arrival order (a copy)."""
        with self._lock:
            return list(self._waiting)

    def waiting_rows(self) -> int:
        """Rows the waiting requests will need."""
        with self._lock:
            return sum(len(r.choices) for r in self._waiting)

    def has_dropped(self) -> bool:
        return bool(self._dropped)

    def drain(self) -> list["Request"]:
        """Empty the queue (the engine is failing or closing); returns what waited."""
        with self._lock:
            out = list(self._waiting) + self._dropped
            self._waiting.clear()
            self._dropped = []
        return out

    def drop_all(self) -> list["Request"]:
        """Move every waiting request to the dropped ones (the engine is closing); returns them."""
        with self._lock:
            moved = list(self._waiting)
            self._waiting.clear()
            self._dropped += moved
        return moved

    def take_dropped(self) -> list["Request"]:
        """The requests cancelled while waiting since the last call."""
        with self._lock:
            dropped, self._dropped = self._dropped, []
        return dropped

    def admit(self) -> list["Request"]:
        """Give rows to waiting requests, in arrival order, while the store has enough free; returns
        the requests admitted."""
        admitted = []
        while True:
            with self._lock:
                if not self._waiting or self.store.free_rows() < len(self._waiting[0].choices):
                    break
                request = self._waiting.popleft()
            first, *others = request.choices
            request.cached_tokens = request.prefilled = self.store.claim(first, request.prompt, request.adapter)
            for choice in others:
                self.store.claim(choice, adapter=request.adapter)
            self.prefilling.append(request)
            admitted.append(request)
        return admitted

    def next_chunk(self) -> tuple["Request", int, int] | None:
        """(request, start, stop): the prompt positions to read this step, or None."""
        if not self.prefilling:
            return None
        request = self.prefilling[0]
        start = request.prefilled
        return request, start, min(start + self.prefill_chunk, request.prompt.shape[0])

    def prefilled(self, request: "Request") -> None:
        """``request``'s prompt is all in the store."""
        self.prefilling.remove(request)

    def forget(self, request: "Request") -> None:
        """Take ``request`` out of the queues (it ended early); its rows are the caller's to release."""
        self.cancel(request)
        with self._lock:
            if request in self._dropped:
                self._dropped.remove(request)
        if request in self.prefilling:
            self.prefilling.remove(request)
