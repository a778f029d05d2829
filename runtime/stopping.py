"""When a sequence stops, and the text it has written so far.

``StopCriteria`` is the stop callback the decode loop calls with each new token of one sequence. It
detokenizes as tokens come (stop strings are found in text, not tokens) and answers with the text
that became final and, when the sequence ends, why: "stop" (a stop token, which is not part of the
output) or "stop_string" (the text is cut just before the string). Text that could still turn out to
be the start of a stop string is held back until it cannot. The token budget is the decode loop's
own business ("length").
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

from .detokenizer import StreamingDetokenizer


class StopCriteria:
    def __init__(self, decode: Callable[[Sequence[int]], str], stop_ids: Iterable[int] = (), stop: tuple[str, ...] = ()):
        self._detok = StreamingDetokenizer(decode)
        self._stop_ids = frozenset(stop_ids)
        self._stop = stop
        self._pending = ""  # decoded text not yet released: it might be the start of a stop string
        self.stopped = False  # once it has given a finish reason, it takes no more tokens

    def __call__(self, token: int) -> tuple[str, str | None]:
        """Text released by ``token`` and the finish reason, or None while the sequence goes on."""
        if token in self._stop_ids:
            return self.finish("stop")
        self._pending += self._detok.add(token)
        if not self._stop:
            out, self._pending = self._pending, ""
            return out, None
        cut = find_stop(self._pending, self._stop)
        if cut is not None:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out, "stop_string"
        keep = held_back(self._pending, self._stop)
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep :]
        return out, None

    def finish(self, reason: str) -> tuple[str, str]:
        """The text still held back once the sequence ends for ``reason`` (an unfinished character
        comes out as U+FFFD, as a full decode shows it), and the reason: "stop_string" instead when
        that text holds a stop string."""
        text = self._pending + self._detok.flush()
        self._pending = ""
        self.stopped = True
        cut = find_stop(text, self._stop) if self._stop else None
        if cut is not None:
            return text[:cut], "stop_string"
        return text, reason


def find_stop(text: str, stop: tuple[str, ...]) -> int | None:
    """Index where the earliest stop string starts in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that could still grow into a stop string."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
