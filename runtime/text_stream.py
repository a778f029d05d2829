"""What a Generator hands back: a TextStream (text pieces as they become final) and Completions
(whole sequences), and the events of finished tokens replayed through a stop callback."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from .request import Event, TokenLogprob
from .stopping import StopCriteria


@dataclass(frozen=True)
class Completion:
    """One generated sequence: its text, token ids (stop tokens excluded), finish reason ("stop",
    "length" or "stop_string"), for beam search its score (sum of log-probs / length **
    length_penalty), and the tokens' log-probabilities when they were asked for."""

    text: str
    token_ids: list[int]
    finish_reason: str
    score: float | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None


class TextStream:
    """Iterate for text pieces. Once exhausted, ``finish_reason`` is "stop" (a stop token),
    "length" (max_new_tokens or the context ran out) or "stop_string"; ``token_ids`` holds the
    generated ids and ``text`` the joined pieces. ``close()`` (or dropping the stream) stops the
    generation early."""

    def __init__(self, events: Iterator[Event], prompt_ids: list[int], on_close: Callable[[], None] = lambda: None):
        self.prompt_ids = prompt_ids
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.text = ""
        self._events = events
        self._on_close = on_close

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        for event in self._events:
            if event.token is not None:
                self.token_ids.append(event.token)
            if event.finish_reason is not None:
                self.finish_reason = event.finish_reason
            if event.text:
                self.text += event.text
                return event.text
        raise StopIteration

    def close(self) -> None:
        self._on_close()

    def __del__(self) -> None:
        self._on_close()


def replay_events(tokens: list[int], reason: str, stop: StopCriteria) -> Iterator[Event]:
    """Events for finished ``tokens`` (from beam search), through a stop callback: text pieces, and
    the cut at a stop string."""
    for token in tokens:
        text, why = stop(token)
        yield Event(0, token, text, why)
        if why is not None:
            return
    text, why = stop.finish(reason)
    yield Event(0, None, text, why)
