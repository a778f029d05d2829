"""The generation options a request may carry, generated from GenerationConfig's fields.

Every field the server offers (metadata ``server``, true unless marked otherwise) is taken from the
request fields its metadata ``aliases`` names (OpenAI's names, or vLLM's for the extras), or else
from a request field of its own name. A field's value is checked by its type (an integer, a number,
a string); the request fields that need more (OpenAI's ranges, ``stop``'s string-or-list,
``logit_bias``, ``response_format``) have a reader of their own here. A field added to
GenerationConfig that the server cannot read by its type stops the server from importing until it
gets a reader or ``server=False``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any, Callable

from ..runtime import GenerationConfig
from ..runtime.checks import is_int, is_number, is_token_ids
from .errors import APIError

# A reader: (the request field's value, its name, the vocabulary size) -> the option's value, or None
# when the value asks for nothing (then the option keeps the model's default).
Reader = Callable[[Any, str, int], Any]


def read_value(body: dict, name: str, check: Callable[[Any], bool], what: str) -> Any:
    """``body[name]`` when ``check`` accepts it (None when absent or null), else a 400 naming it."""
    value = body.get(name)
    if value is not None and not check(value):
        raise APIError(400, f"'{name}' must be {what}", name)
    return value


def is_finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _checked(check: Callable[[Any], bool], what: str) -> Reader:
    def read(value: Any, name: str, _vocab: int) -> Any:
        return read_value({name: value}, name, check, what)

    return read


def _positive_int(value: Any, name: str, _vocab: int) -> int:
    return read_value({name: value}, name, lambda v: is_int(v) and v >= 1, "a positive integer")


def _sequences(value: Any, name: str, _vocab: int) -> int:
    read_value({name: value}, name, is_int, "an integer")
    if value < 1:
        raise APIError(400, f"'{name}' must be at least 1", name)
    return value


def _temperature(value: Any, name: str, _vocab: int) -> float:
    read_value({name: value}, name, is_finite, "a number")
    if value > 2:
        raise APIError(400, f"'{name}' must be between 0 and 2", name)
    return value


def _is_strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(s, str) and s for s in value)


def _stop(value: Any, name: str, _vocab: int) -> list[str]:
    value = [value] if isinstance(value, str) else value
    if not _is_strings(value):
        raise APIError(400, f"'{name}' must be a non-empty string or a list of them", name)
    return value


def _strings(value: Any, name: str, _vocab: int) -> list[str]:
    return read_value({name: value}, name, lambda v: _is_strings(v) and v, "a non-empty list of non-empty strings")


def _stop_token_ids(value: Any, name: str, vocab: int) -> list[int] | None:
    """Token ids that stop generation besides the end-of-sequence ones (vLLM's meaning)."""
    if value == []:
        return None
    if not is_token_ids(value, vocab):
        raise APIError(400, f"'{name}' must be a list of token ids below {vocab}", name)
    return value


def _logit_bias(bias: Any, name: str, vocab: int):
    """OpenAI's logit_bias ({"token id": bias from -100 to 100}) as a logits processor."""
    if not isinstance(bias, dict):
        raise APIError(400, f"'{name}' must map token ids to numbers", name)
    ids, values = [], []
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= len(str(vocab)) and int(key) < vocab):
            raise APIError(400, f"'{name}' key {key[:20]!r} is not a token id below {vocab}", name)
        if not is_number(value) or not -100 <= value <= 100:
            raise APIError(400, f"'{name}' values must be numbers from -100 to 100", name)
        ids.append(int(key))
        values.append(float(value))

    def logit_bias(token_ids, logits):
        logits[ids] += values
        return logits

    return [logit_bias]


def _response_format(fmt: Any, name: str, _vocab: int) -> dict | bool | None:
    """The JSON schema OpenAI's response_format asks for (None: free text)."""
    if fmt == {"type": "text"}:
        return None
    bad = APIError(
        400, f"'{name}' must be {{\"type\": \"text\"}}, {{\"type\": \"json_object\"}} or "
        "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}", name,
    )  # fmt: skip
    if not isinstance(fmt, dict):
        raise bad
    if fmt.get("type") == "json_object" and set(fmt) == {"type"}:
        return {"type": "object"}
    spec = fmt.get("json_schema")
    if fmt.get("type") != "json_schema" or set(fmt) != {"type", "json_schema"} or not isinstance(spec, dict):
        raise bad
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, (dict, bool)):
        raise APIError(400, f"'{name}.json_schema.schema' must be a JSON schema object", name)
    return schema


def _is_schema(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return False
    return isinstance(value, (dict, bool))


# The request fields whose values need more than a check of their type.
_READERS: dict[str, Reader] = {
    "max_completion_tokens": _positive_int,
    "max_tokens": _positive_int,
    "n": _sequences,
    "temperature": _temperature,
    "stop": _stop,
    "stop_token_ids": _stop_token_ids,
    "logit_bias": _logit_bias,
    "response_format": _response_format,
    "guided_json": _checked(_is_schema, "a JSON schema: an object, or its JSON text"),
    "guided_choice": _strings,
}
_BY_TYPE: dict[Any, Reader] = {
    int: _checked(is_int, "an integer"),
    int | None: _checked(is_int, "an integer"),
    float: _checked(is_finite, "a number"),
    str: _checked(lambda v: isinstance(v, str), "a string"),
    str | None: _checked(lambda v: isinstance(v, str), "a string"),
}


def _request_fields() -> dict[str, tuple[str, Reader]]:
    """Request field -> (GenerationConfig field, reader), the aliases of a field in their order."""
    hints = typing.get_type_hints(GenerationConfig)
    table: dict[str, tuple[str, Reader]] = {}
    for f in dataclasses.fields(GenerationConfig):
        if not f.metadata.get("server", True):
            continue
        for name in f.metadata.get("aliases") or (f.name,):
            reader = _READERS.get(name) or _BY_TYPE.get(hints[f.name])
            if reader is None:
                raise TypeError(f"GenerationConfig.{f.name} ({hints[f.name]}) has no reader for the request field {name!r}")
            table[name] = (f.name, reader)
    return table


REQUEST_FIELDS = _request_fields()
SERVED = tuple(dict.fromkeys(field for field, _ in REQUEST_FIELDS.values()))
# The request field named in errors about an option the request did not set: OpenAI's max_tokens, or
# the first alias.
DEFAULT_PARAMS = {
    field: next(n for n, (f, _) in REQUEST_FIELDS.items() if f == field) for field in SERVED
} | {"max_new_tokens": "max_tokens"}

GenerationOptions = dataclasses.make_dataclass(
    "GenerationOptions", [(name, Any, dataclasses.field(default=None)) for name in SERVED], frozen=True,
)
GenerationOptions.__doc__ = """The generation options a request set, checked; None: the model's default."""


def read_options(body: dict, vocab: int) -> tuple[Any, dict[str, str]]:
    """The request's GenerationOptions and, for each option it set, the request field that set it.
    Several aliases of one option may be given with the same value only (then the first in the
    metadata's order is named in errors)."""
    values: dict[str, Any] = {}
    params: dict[str, str] = {}
    for name, (field, read) in REQUEST_FIELDS.items():
        if body.get(name) is None:
            continue
        value = read(body[name], name, vocab)
        if value is not None and field in values and value != values[field]:
            raise APIError(400, f"'{params[field]}' and '{name}' set the same option to different values; give one", name)
        if value is not None and field not in values:
            values[field], params[field] = value, name
    return GenerationOptions(**values), params


def option_values(options: Any) -> dict[str, Any]:
    """The options set, by GenerationConfig field."""
    return {name: getattr(options, name) for name in SERVED if getattr(options, name) is not None}
