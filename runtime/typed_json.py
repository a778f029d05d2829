"""A manifest section read from JSON into its dataclass: every field known, present (or defaulted)
and of the type its annotation declares, or ManifestError naming the field in one line."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from .checks import is_int, is_number
from .model_dir import ManifestError

JSON_TYPES = {  # a field's annotation -> the JSON values it takes
    "int": is_int,
    "float": is_number,
    "str": lambda v: isinstance(v, str),
    "int | None": lambda v: v is None or is_int(v),
    "str | None": lambda v: v is None or isinstance(v, str),
    "tuple[int, ...]": lambda v: isinstance(v, tuple) and all(is_int(x) for x in v),
    "tuple[str, ...]": lambda v: isinstance(v, tuple) and all(isinstance(x, str) for x in v),
    "bool": lambda v: isinstance(v, bool),
}


def section(d: dict[str, Any], name: str) -> dict[str, Any]:
    """The JSON object ``d[name]``; ManifestError when it is missing or not an object."""
    value = d.get(name)
    if not isinstance(value, dict):
        raise ManifestError(f"malformed manifest: {name} is {'missing' if value is None else 'not an object'}")
    return value


def typed(cls, data: Any, name: str):
    """``cls(**data)`` once every field is known, present (or defaulted) and of its declared type;
    ``name`` is the section's dotted name in errors ("graph.io")."""
    if not isinstance(data, dict):
        raise ManifestError(f"malformed manifest: {name} is not an object")
    known = {f.name: f for f in fields(cls)}
    for key, value in data.items():
        if key not in known:
            raise ManifestError(f"malformed manifest: {name} has an unknown field {key!r}")
        check = JSON_TYPES.get(known[key].type)
        if check is not None and not check(value):
            raise ManifestError(f"malformed manifest: {name}.{key} must be {known[key].type}, got {value!r}")
    try:
        return cls(**data)
    except TypeError as e:  # a required field is missing
        raise ManifestError(f"malformed manifest: {name}: {e}") from None
