"""The HTTP/1.1 protocol ``lmrt serve`` runs under uvicorn: uvicorn's h11 protocol, whose answer to a
request that is not HTTP (a garbage request line, a request line or headers past the size limit) is
OpenAI's JSON error body, as every other error's, instead of plain text. The connection is closed
after it, as uvicorn does. A long URL that h11 did read whole is refused by ``long_urls_refused``."""

from __future__ import annotations

import json
import sys
from http import HTTPStatus

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_HEAD_BYTES = 64 * 1024  # a request line and its headers together
MAX_URL_BYTES = 16 * 1024  # a request's path and query


def error_body(status: int, message: str, code: str) -> bytes:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


def long_urls_refused(app):
    """An ASGI app answering 414 to a URL longer than MAX_URL_BYTES, and passing the rest to ``app``."""

    async def guarded(scope, receive, send):
        if scope["type"] == "http" and len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") > MAX_URL_BYTES:
            body = error_body(414, f"the URL is longer than {MAX_URL_BYTES} bytes", "uri_too_long")
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 414, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await app(scope, receive, send)

    return guarded


class JSONErrorsProtocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:  # called while h11's RemoteProtocolError is handled
        error = sys.exc_info()[1]
        status = getattr(error, "error_status_hint", 400)
        if status == 431 and b"\n" not in bytes(self.conn._receive_buffer):
            status, why, code = 414, f"the request line is longer than {MAX_HEAD_BYTES} bytes", "uri_too_long"
        elif status == 431:
            why, code = f"the request line and headers are larger than {MAX_HEAD_BYTES} bytes", "headers_too_large"
        else:
            why, code = (f"the request is not valid HTTP/1.1: {str(error)[:200]}" if error else msg), "invalid_http"
        body = error_body(status, why, code)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        try:
            response = h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase.encode())
            self.transport.write(self.conn.send(response))
            self.transport.write(self.conn.send(h11.Data(data=body)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:  # h11 cannot answer in this state: the connection just closes
            pass
        self.transport.close()
