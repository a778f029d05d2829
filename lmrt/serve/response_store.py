"""The answers of ``POST /v1/responses`` kept for ``previous_response_id``: in memory, for the
server's lifetime, at most a fixed number, the least recently used going first."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class StoredResponse:
    """An answer as the client got it, and the conversation it ends: every message before it (the
    instructions left out, as OpenAI does) and the answer's own, in the chat route's shape."""

    response: dict
    conversation: tuple[dict, ...]


class ResponseStore:
    """At most ``capacity`` answers by id (0: none is kept); reading one makes it the most recent."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._answers: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._answers)

    def put(self, answer: StoredResponse) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._answers[answer.response["id"]] = answer
            self._answers.move_to_end(answer.response["id"])
            while len(self._answers) > self.capacity:
                self._answers.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            answer = self._answers.get(response_id)
            if answer is not None:
                self._answers.move_to_end(response_id)
            return answer

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._answers.pop(response_id, None) is not None
