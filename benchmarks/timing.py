"""The one timing loop the decode benchmarks share."""

from __future__ import annotations

import time


def steady_decode_speed(gen, prompt, config) -> float:
    """Tokens/s of ``gen`` decoding ``prompt`` under ``config``, from its first new token on (so the
    prefill is left out)."""
    first, count = None, 0
    for _ in gen.iter_tokens(prompt, config):
        count += 1
        if first is None:
            first = time.perf_counter()
    return (count - 1) / (time.perf_counter() - first)
