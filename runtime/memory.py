"""How much memory a request would take, checked before it is taken: a request the machine cannot
hold is refused with the field to lower, instead of running the process out of memory."""

from __future__ import annotations

import os

from .config import ConfigError


def available_bytes() -> int | None:
    """Memory the system can still give (Linux MemAvailable; else the free physical pages); None
    when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(field: str, value: int, rows: int, capacity: int, per_position: int, vocab: int) -> None:
    """Refuse ``rows`` cache rows of ``capacity`` positions (``per_position`` bytes each) plus their
    float32 logits when they would not fit in the memory available, naming ``field`` (whose value
    ``value`` asked for them)."""
    need = rows * capacity * per_position + rows * vocab * 4 * 2
    have = available_bytes()
    if have is not None and need > have:
        raise ConfigError(
            field,
            f"is {value}: {rows} sequences of up to {capacity} tokens need {need / 1e9:.1f} GB for their cache and "
            f"logits, more than the {have / 1e9:.1f} GB available; lower it or max_new_tokens",
        )
