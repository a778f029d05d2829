"""Small value checks shared by every layer that validates input at its edge."""

from __future__ import annotations

import numbers


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer (Python or numpy) and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """Whether ``value`` is a real number (int, float, numpy) and not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_token_ids(value: object, vocab_size: int) -> bool:
    """Whether ``value`` is a non-empty list (or tuple) of token ids below ``vocab_size``."""
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(is_int(t) and 0 <= t < vocab_size for t in value)
    )
