"""ServeError: why ``lmrt serve`` cannot start, in one line meant for the user."""

from __future__ import annotations


class ServeError(Exception):
    """The server cannot start; the message is one line meant for the user."""
