"""The server's errors: ServeError (why ``lmrt serve`` cannot start, one line for the user) and
APIError (a request's error, answered with OpenAI's JSON error body and its HTTP status)."""

from __future__ import annotations

from typing import Mapping

from ..runtime import ConfigError

RETRY_AFTER_SECONDS = 1  # a 503's Retry-After


class ServeError(Exception):
    """The server cannot start; the message is one line meant for the user."""


class APIError(Exception):
    """An error answered with OpenAI's JSON error body (and ``headers``, such as a 503's Retry-After)."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def busy(message: str, code: str) -> APIError:
    """A 503: the server cannot take the request now; the client may retry after a second."""
    return APIError(503, message, code=code, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def config_error(e: ConfigError, params: Mapping[str, str]) -> APIError:
    """A 400 for a bad generation option, naming the request field that set it (``params``:
    GenerationConfig field -> request field)."""
    param = params.get(e.field, e.field)
    return APIError(400, e.named(f"'{param}'"), param)
