"""A request's JSON body, read once and checked before any route looks at it.

The body is read within the server's size limit (413) and its read timeout (408, the connection then
closed): a client that sends less than its Content-Length cannot hold a connection open. The JSON is
parsed strictly: nesting deeper than ``MAX_DEPTH``, NaN and Infinity (and numbers too large for a
float), duplicate keys and strings that are not Unicode text (a lone surrogate such as ``"\\ud800"``)
are refused with a 400 naming where they are. Every layer below takes the body's strings and numbers
as they are.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

from starlette.requests import ClientDisconnect, Request

from .errors import APIError

MAX_DEPTH = 64  # arrays and objects inside each other


async def read_json(request: Request, max_bytes: int, timeout: float) -> Any:
    """The request's body parsed and checked; a 4xx APIError otherwise."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    try:
        data = await asyncio.wait_for(_read(request, max_bytes), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout",
                       headers={"Connection": "close"}) from None  # fmt: skip
    except ClientDisconnect:
        raise APIError(499, "the client closed the connection while sending its body", code="client_closed_request") from None
    return parse_json(data)


async def _read(request: Request, max_bytes: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"the request body is larger than {max_bytes} bytes", code="request_too_large")


def parse_json(data: bytes) -> Any:
    """``data`` as JSON, strictly (see the module's docstring)."""
    try:
        value = json.loads(data, parse_constant=_no_constant, parse_float=_finite_float, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise _invalid(f"arrays and objects are nested deeper than {MAX_DEPTH}") from None
    except _Refused as e:
        raise _invalid(str(e)) from None
    except UnicodeDecodeError as e:
        raise _invalid(f"the body is not UTF-8: {e}") from None
    except ValueError as e:  # JSONDecodeError, or an integer of more digits than Python converts
        raise _invalid(str(e)) from None
    check_value(value)
    return value


def check_value(value: Any) -> None:
    """Refuse nesting deeper than MAX_DEPTH and strings with lone surrogates, naming where they are."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, str):
            if not _is_text(item):
                raise APIError(400, f"'{where or 'the body'}' holds a lone surrogate, which is not Unicode text",
                               where.split("[")[0].split(".")[0] or None, "invalid_string")  # fmt: skip
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth >= MAX_DEPTH:
            raise _invalid(f"arrays and objects are nested deeper than {MAX_DEPTH}")
        if isinstance(item, dict):
            for key, member in item.items():
                if not _is_text(key):
                    raise _invalid("a key holds a lone surrogate, which is not Unicode text")
                stack.append((member, f"{where}.{key}" if where else key, depth + 1))
        else:
            stack.extend((member, f"{where}[{i}]", depth + 1) for i, member in enumerate(item))


def _is_text(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Refused(ValueError):
    pass


def _no_constant(name: str) -> None:
    raise _Refused(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:40]} is too large")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Refused(f"the key '{repeated}' appears twice in one object")
    return out


def _invalid(why: str) -> APIError:
    return APIError(400, f"the request body is not valid JSON: {why}", code="invalid_json")
