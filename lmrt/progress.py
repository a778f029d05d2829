"""Progress lines of the long-running stages (export, quantize): one line each, on stderr."""

from __future__ import annotations

import sys


def to_stderr(message: str) -> None:
    """The default progress printer of ``export_model`` and ``quantize_directory``."""
    print(message, file=sys.stderr, flush=True)
