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


MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now, as memory pressure would (no data is lost)


def release_file_pages(path: str) -> int:
    """Ask the kernel to reclaim this process's resident pages of the file ``path`` (onnxruntime maps
    external weights privately). After prepacking, the only weights still read from the file are the
    embedding table's rows (a tied table was read whole to pack the lm_head); reclaimed, its pages
    come back one row at a time as tokens are looked up. MADV_PAGEOUT loses nothing: a clean page is
    read again from the file when touched, and a page the process changed would go to swap or stay.
    Returns the bytes advised; 0 where the platform has no such call."""
    import ctypes

    real = os.path.realpath(path)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or parts[5].strip() != real:
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        if madvise(start, end - start, MADV_PAGEOUT) == 0:
            advised += end - start
    return advised


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc; a no-op elsewhere): loading a
    tokenizer or a session leaves many freed temporaries behind."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def settle_memory(model_dir: str, manifest) -> None:
    """After a session is created: the heap's free pages and the weight file's pages go back to
    the system (see ``trim_heap`` and ``release_file_pages``)."""
    trim_heap()
    if manifest.graph.data_file:
        release_file_pages(os.path.join(model_dir, manifest.graph.data_file))
