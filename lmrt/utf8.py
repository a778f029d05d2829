"""Whether text typed by the user is UTF-8: the command line's options and ``lmrt chat``'s lines."""

from __future__ import annotations


def is_utf8(text: str) -> bool:
    """False for text decoded with errors="surrogateescape" from bytes that are not UTF-8 (how
    Python reads argv, and stdin in some locales)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
