"""The scheduler: which request the model reads next, into which cache rows, and how much per step.

Requests wait in arrival order, at most ``max_waiting`` of them (past that, ``submit`` refuses with
QueueFullError rather than dropping anything). A waiting request is admitted as soon as the cache has
a free row for each of its choices: its first choice gets the free row that shares the longest prefix
with its prompt (those positions are not computed again), the others any free row. Admitted requests
are prefilled in arrival order, at most ``prefill_chunk`` prompt tokens per step, so the sequences
already decoding keep getting a token every step while a long prompt is read.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from .kv_cache import KVCache

if TYPE_CHECKING:
    from .decoding import Request


class QueueFullError(RuntimeError):
    """More requests are waiting than the queue may hold."""


class Scheduler:
    def __init__(self, cache: KVCache, prefill_chunk: int = 512, max_waiting: int | None = None):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive integer, got {prefill_chunk}")
        self.cache = cache
        self.prefill_chunk = prefill_chunk
        self.max_waiting = max_waiting
        self.waiting: deque[Request] = deque()
        self.prefilling: deque[Request] = deque()

    def submit(self, request: "Request") -> None:
        if self.max_waiting is not None and len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"the server is busy: {len(self.waiting)} requests are already waiting")
        self.waiting.append(request)

    def admit(self) -> None:
        """Give rows to waiting requests, in arrival order, while the cache has enough free."""
        while self.waiting and self.cache.free_rows() >= len(self.waiting[0].choices):
            request = self.waiting.popleft()
            first, *others = request.choices
            request.cached_tokens = request.prefilled = self.cache.claim(first, request.prompt)
            for choice in others:
                self.cache.claim(choice)
            self.prefilling.append(request)

    def next_chunk(self) -> tuple["Request", int, int] | None:
        """(request, start, stop): the prompt positions to read this step, or None."""
        if not self.prefilling:
            return None
        request = self.prefilling[0]
        start = request.prefilled
        return request, start, min(start + self.prefill_chunk, request.prompt.shape[0])

    def prefilled(self, request: "Request") -> None:
        """``request``'s prompt is all in the cache."""
        self.prefilling.remove(request)

    def forget(self, request: "Request") -> None:
        """Take ``request`` out of the queues (it was cancelled); its rows are the caller's to release."""
        for queue in (self.waiting, self.prefilling):
            if request in queue:
                queue.remove(request)
