"""The HTTP side of ``lmrt serve``: OpenAI's routes over one runtime Engine.

Each request is checked (``protocol``), submitted to the engine, and answered from the events the
engine's thread sends back through the event loop. Streams are Server-Sent Events in OpenAI's chunk
format. Whether streamed or not, a request is raced against the client's disconnect message, so a
client that leaves frees its slot at the engine's next step, also while it waits for a slot.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from functools import partial
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ..runtime import ConfigError, Encoder, Engine, Event, Generator, QueueFullError
from . import metrics, protocol
from .protocol import APIError, Parsed


@dataclass
class ServerState:
    """What the routes share: once the model is loaded, the engine (a generation model) or the
    encoder (an embedding model); or why loading failed."""

    model_name: str
    api_key: str | None
    max_body_bytes: int
    engine: Engine | None = None
    encoder: Encoder | None = None
    load_error: str | None = None
    embedding_requests: int = 0
    embedded_tokens: int = 0

    @property
    def ready(self) -> bool:
        return self.engine is not None or self.encoder is not None


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="lmrt", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lmrt = state

    @app.exception_handler(APIError)
    async def api_error(_request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(404)
    async def not_found(request: Request, _e) -> JSONResponse:
        return JSONResponse(APIError(404, f"no route {request.url.path}").body(), status_code=404)

    @app.exception_handler(405)
    async def wrong_method(request: Request, _e) -> JSONResponse:
        return JSONResponse(APIError(405, f"{request.method} is not allowed on {request.url.path}").body(), status_code=405)

    @app.exception_handler(Exception)
    async def internal(_request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not state.ready:
            return JSONResponse({"status": "loading model"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        _authorize(state, request)
        _ready(state)
        length = state.engine.ctx_size if state.engine else state.encoder.max_length
        card = {
            "id": state.model_name, "object": "model", "created": protocol.now(), "owned_by": "lmrt",
            "max_model_len": length,
        }  # fmt: skip
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/metrics")
    async def prometheus(request: Request) -> PlainTextResponse:
        _authorize(state, request)
        _ready(state)
        if state.engine is not None:
            text = metrics.render(state.engine.status())
        else:
            text = metrics.render_encoder(state.embedding_requests, state.embedded_tokens)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        _authorize(state, request)
        _ready(state)
        encoder = state.encoder
        if encoder is None or encoder.task != "embed":
            what = "a generation model" if encoder is None else "a classifier"
            raise APIError(400, f"this server serves {what}, which gives no embeddings", code="model_not_embedding")
        parsed = protocol.parse_embeddings(await _json_body(state, request), encoder, state.model_name)
        work = asyncio.ensure_future(asyncio.to_thread(encoder.run_ids, parsed.ids))
        vectors = await _unless_disconnected(request, work, lambda: None)
        if vectors is None:
            return Response(status_code=499)
        state.embedding_requests += 1
        state.embedded_tokens += sum(len(p) for p in parsed.ids)
        return JSONResponse(protocol.embeddings_response(vectors, parsed, state.model_name))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _complete(state, request, protocol.parse_chat, _ChatAnswer)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _complete(state, request, protocol.parse_completion, _TextAnswer)

    return app


def _ready(state: ServerState) -> None:
    if not state.ready:
        raise APIError(503, "the model is still loading", code="model_loading")


def _engine(state: ServerState) -> Engine:
    _ready(state)
    if state.engine is None:
        raise APIError(400, "this server serves an embedding or classification model: use POST /v1/embeddings",
                       code="model_not_generative")  # fmt: skip
    return state.engine


def _authorize(state: ServerState, request: Request) -> None:
    if state.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or key.strip() != state.api_key:
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")


async def _json_body(state: ServerState, request: Request) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > state.max_body_bytes:
        raise APIError(413, f"the request body is larger than {state.max_body_bytes} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > state.max_body_bytes:
            raise APIError(413, f"the request body is larger than {state.max_body_bytes} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None


@dataclass
class _Run:
    """One HTTP request's engine requests (one per prompt), and their events as they arrive."""

    parsed: Parsed
    requests: list
    queue: asyncio.Queue

    @property
    def n(self) -> int:
        return self.parsed.config.num_return_sequences

    def cancel(self, engine: Engine) -> None:
        for r in self.requests:
            engine.cancel(r)


def _submit(engine: Engine, parsed: Parsed) -> _Run:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    run = _Run(parsed, [], queue)
    try:
        for p, ids in enumerate(parsed.prompts):
            request = engine.request(ids, parsed.config, partial(_deliver, loop, queue, p), parsed.logprobs)
            run.requests.append(engine.submit(request))
    except QueueFullError as e:
        run.cancel(engine)
        raise APIError(503, str(e), code="server_busy") from None
    except ConfigError as e:  # a constraint found invalid once compiled
        run.cancel(engine)
        raise protocol.config_error(e, parsed.params) from None
    except ValueError as e:
        run.cancel(engine)
        raise APIError(400, str(e)) from None
    return run


def _deliver(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, prompt: int, event: Event) -> None:
    """From the engine's thread: hand ``event`` of prompt ``prompt`` to the event loop."""
    try:
        loop.call_soon_threadsafe(queue.put_nowait, (prompt, event))
    except RuntimeError:  # the event loop is closed: the server is shutting down
        pass


async def _events(run: _Run) -> AsyncIterator[tuple[int, Event]]:
    """(choice index, event) until every choice has finished."""
    open_choices = len(run.requests) * run.n
    while open_choices:
        prompt, event = await run.queue.get()
        if event.finish_reason == "error":
            error = run.requests[prompt].error
            raise APIError(500, f"generation failed: {type(error).__name__}: {error}")
        if event.finish_reason is not None:
            open_choices -= 1
        yield prompt * run.n + event.choice, event


async def _complete(state: ServerState, request: Request, parse, answer) -> Response:
    _authorize(state, request)
    engine = _engine(state)
    body = await _json_body(state, request)
    parsed = parse(body, engine.model, state.model_name, engine.ctx_size)
    run = _submit(engine, parsed)
    if parsed.stream:
        return _DisconnectAwareStream(_sse(answer.stream(run, state)), on_disconnect=partial(run.cancel, engine))
    result = await _unless_disconnected(request, asyncio.ensure_future(answer.whole(run, state)), partial(run.cancel, engine))
    return Response(status_code=499) if result is None else JSONResponse(result)


async def _unless_disconnected(request: Request, work: asyncio.Future, on_disconnect: Callable[[], None]):
    """``work``'s result, or None once the client has left (then ``on_disconnect`` runs and the work
    is cancelled)."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the request was cancelled (Ray Serve's way of saying the client left)
        work.cancel()
        on_disconnect()
        raise
    finally:
        gone.cancel()
    if work not in done:
        work.cancel()
        on_disconnect()
        return None
    return work.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _DisconnectAwareStream(StreamingResponse):
    """A stream that always listens for the client's disconnect (Starlette's own listens only for
    older ASGI servers) and then cancels the generation at once, even before a token is sent."""

    def __init__(self, content, on_disconnect: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_disconnect = on_disconnect

    async def __call__(self, scope, receive, send) -> None:
        stream = asyncio.ensure_future(self.stream_response(send))
        gone = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            done, _ = await asyncio.wait({stream, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not stream.done():
                self._on_disconnect()
                stream.cancel()
            gone.cancel()
        if stream in done:
            try:
                stream.result()
            except OSError:  # the connection broke while sending
                self._on_disconnect()


async def _sse(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    except APIError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    yield "data: [DONE]\n\n"


@dataclass
class _Collected:
    """Every choice's whole output, for an answer that is not streamed."""

    texts: list[str]
    tokens: list[int]
    logprobs: list[list]
    reasons: list[str | None]


async def _collect(run: _Run) -> _Collected:
    count = len(run.requests) * run.n
    out = _Collected([""] * count, [0] * count, [[] for _ in range(count)], [None] * count)
    async for i, event in _events(run):
        out.texts[i] += event.text
        out.tokens[i] += event.token is not None
        if event.logprob is not None:
            out.logprobs[i].append(event.logprob)
        out.reasons[i] = event.finish_reason or out.reasons[i]
    return out


class _ChatAnswer:
    """Chat completion responses and chunks."""

    @staticmethod
    async def whole(run: _Run, state: ServerState) -> dict:
        gen = state.engine.model
        got = await _collect(run)
        choices = []
        for i in range(len(got.texts)):
            message, reason = _chat_message(run, got.texts[i], got.reasons[i])
            choices.append({
                "index": i,
                "message": message,
                "logprobs": protocol.chat_logprobs(gen, got.logprobs[i]) if run.parsed.logprobs is not None else None,
                "finish_reason": reason,
            })  # fmt: skip
        return {**_head(state, "chatcmpl", "chat.completion"), "choices": choices, "usage": _usage(run, sum(got.tokens))}

    @staticmethod
    async def stream(run: _Run, state: ServerState) -> AsyncIterator[dict]:
        gen = state.engine.model
        head, extra = _head(state, "chatcmpl", "chat.completion.chunk"), _usage_field(run)
        count = len(run.requests) * run.n
        for i in range(count):
            delta = {"role": "assistant", "content": ""}
            yield {**head, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}], **extra}
        if run.parsed.tools:  # whether the answer is a call is known once it is complete: it comes whole
            got = await _collect(run)
            for i in range(count):
                message, reason = _chat_message(run, got.texts[i], got.reasons[i])
                delta = {k: v for k, v in message.items() if k != "role"}
                if "tool_calls" in delta:
                    delta["tool_calls"] = [{"index": j, **c} for j, c in enumerate(delta["tool_calls"])]
                yield {**head, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}], **extra}
            if run.parsed.include_usage:
                yield {**head, "choices": [], "usage": _usage(run, sum(got.tokens))}
            return

        def choice(i: int, event: Event) -> dict:
            logprobs = protocol.chat_logprobs(gen, [event.logprob]) if event.logprob is not None else None
            return {"index": i, "delta": {"content": event.text} if event.text else {}, "logprobs": logprobs}

        async for chunk in _chunks(run, head, extra, choice):
            yield chunk


def _chat_message(run: _Run, text: str, reason: str | None) -> tuple[dict, str | None]:
    """A chat answer's message and finish reason: with tools, a complete answer that is a call
    comes as OpenAI's tool_calls (finish reason "tool_calls")."""
    calls = protocol.tool_calls(text, run.parsed.tools) if run.parsed.tools and reason == "stop" else None
    if calls:
        return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
    return {"role": "assistant", "content": text}, protocol.finish_reason(reason)


class _TextAnswer:
    """Completion (text) responses and chunks."""

    @staticmethod
    async def whole(run: _Run, state: ServerState) -> dict:
        gen = state.engine.model
        got = await _collect(run)
        choices = [
            {
                "index": i,
                "text": got.texts[i],
                "logprobs": protocol.completion_logprobs(gen, got.logprobs[i]) if run.parsed.logprobs is not None else None,
                "finish_reason": protocol.finish_reason(got.reasons[i]),
            }
            for i in range(len(got.texts))
        ]
        return {**_head(state, "cmpl", "text_completion"), "choices": choices, "usage": _usage(run, sum(got.tokens))}

    @staticmethod
    async def stream(run: _Run, state: ServerState) -> AsyncIterator[dict]:
        gen = state.engine.model
        head, extra = _head(state, "cmpl", "text_completion"), _usage_field(run)
        offsets = [0] * (len(run.requests) * run.n)

        def choice(i: int, event: Event) -> dict:
            logprobs = None
            if event.logprob is not None:
                logprobs = protocol.completion_logprobs(gen, [event.logprob], offsets[i])
            offsets[i] += len(event.text)
            return {"index": i, "text": event.text, "logprobs": logprobs}

        async for chunk in _chunks(run, head, extra, choice):
            yield chunk


async def _chunks(run: _Run, head: dict, extra: dict, choice: Callable[[int, Event], dict]) -> AsyncIterator[dict]:
    """A streamed answer's chunks, one per event that carries text, a log-probability or a finish
    reason (``choice`` builds the choice's own fields), then the usage chunk when asked for."""
    generated = 0
    async for i, event in _events(run):
        generated += event.token is not None
        if event.text or event.finish_reason or event.logprob is not None:
            body = {**choice(i, event), "finish_reason": protocol.finish_reason(event.finish_reason)}
            yield {**head, "choices": [body], **extra}
    if run.parsed.include_usage:
        yield {**head, "choices": [], "usage": _usage(run, generated)}


def _head(state: ServerState, id_prefix: str, kind: str) -> dict:
    """The fields every response and chunk of one answer starts with (a new id for each answer)."""
    return {"id": protocol.new_id(id_prefix), "object": kind, "created": protocol.now(), "model": state.model_name}


def _usage_field(run: _Run) -> dict:
    """What each chunk carries when the client asked for a usage chunk: ``usage: null``."""
    return {"usage": None} if run.parsed.include_usage else {}


def _usage(run: _Run, generated: int) -> dict:
    prompt = sum(len(p) for p in run.parsed.prompts)
    cached = sum(r.cached_tokens for r in run.requests)
    return protocol.usage(prompt, generated, cached)
