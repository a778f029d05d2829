"""Incremental detokenization that never splits a character.

Byte-level tokenizers can end a token in the middle of a multibyte UTF-8 character; decoding such a
prefix yields U+FFFD. The detokenizer decodes a short window of recent tokens twice, with and without
the newest ones, and releases the difference only once it no longer ends in U+FFFD. Decoding a window
(not just the new token) keeps word-boundary spaces right for SentencePiece-style tokenizers.
"""

from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"


class StreamingDetokenizer:
    """Feed token ids one at a time with ``add``; it returns the text that became final."""

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self._tokens: list[int] = []
        self._prefix = 0  # start of the decoding window
        self._read = 0  # tokens before this index have been released as text

    def add(self, token_id: int) -> str:
        self._tokens.append(token_id)
        done = self._decode(self._tokens[self._prefix : self._read])
        text = self._decode(self._tokens[self._prefix :])
        if len(text) > len(done) and not text.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self._tokens)
            return text[len(done) :]
        return ""

    def flush(self) -> str:
        """Text still held back at the end of generation (an unfinished character comes out as U+FFFD,
        as a full decode would show it)."""
        done = self._decode(self._tokens[self._prefix : self._read])
        text = self._decode(self._tokens[self._prefix :])
        self._prefix = self._read = len(self._tokens)
        return text[len(done) :]
