"""The HTTP side of ``lmrt serve``: OpenAI's routes over one runtime Engine, or one Encoder.

Each request body is checked once into a typed request (``chat``, ``completions``, ``embeddings``),
submitted to the engine and answered from the events its thread sends back (``bridge``). Streams are
Server-Sent Events in OpenAI's chunk format; a client that leaves, streamed or not, frees its slot at
the engine's next step. This module holds the app, its authorization, error handlers and routes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from ..runtime import Encoder, Engine, LoadedModel
from . import adapters_api, metrics, rerank, responses_api, tokenize
from .body import read_json
from .bridge import EventStream, submit, unless_disconnected
from .chat import ChatAnswer, parse_chat
from .completions import TextAnswer, parse_completion
from .embeddings import embeddings_response, parse_embeddings
from .errors import RETRY_AFTER_SECONDS, APIError, busy
from .response_store import ResponseStore
from .responses import now, sse


@dataclass
class ServerState:
    """What the routes share: once the model is loaded, the engine (a generation model) or the
    encoder (an embedding model); or why loading failed."""

    model_name: str
    api_key: str | None
    max_body_bytes: int
    body_timeout: float  # seconds a request's body may take to arrive
    engine: Engine | None = None
    encoder: Encoder | None = None
    load_error: str | None = None
    response_store: ResponseStore | None = None  # the answers kept for previous_response_id (None: none)
    allow_adapter_loading: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter served
    max_adapters: int | None = None  # the most LoRA adapters held at once (None: no bound)
    embedding_requests: int = 0
    embedded_tokens: int = 0

    @property
    def ready(self) -> bool:
        return self.engine is not None or self.encoder is not None

    @property
    def model(self) -> LoadedModel:
        """The generation model the engine runs: its tokenizer, chat template and defaults."""
        return self.engine.model


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="lmrt", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lmrt = state

    @app.exception_handler(APIError)
    async def api_error(_request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

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
            return JSONResponse({"status": "loading model"}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": _cards(state, request)})

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
        parsed = parse_embeddings(await _json_body(state, request), encoder, state.model_name)
        vectors = await unless_disconnected(request.receive, asyncio.to_thread(encoder.run_ids, parsed.ids), lambda: None)
        if vectors is None:
            return Response(status_code=499)
        state.embedding_requests += 1
        state.embedded_tokens += sum(len(p) for p in parsed.ids)
        return JSONResponse(embeddings_response(vectors, parsed, state.model_name))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _complete(state, request, parse_chat, ChatAnswer)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _complete(state, request, parse_completion, TextAnswer)

    responses_api.register(app, state)
    rerank.register(app, state)
    adapters_api.register(app, state, partial(_authorized_engine, state), partial(_json_body, state))
    tokenize.register(app, state.model_name, partial(_authorized_engine, state), partial(_json_body, state), partial(_cards, state))
    return app


def _cards(state: ServerState, request: Request) -> list[dict]:
    """The served model's card, then one per LoRA adapter (a model of its own, the base its
    ``parent``), for an authorized request."""
    _authorize(state, request)
    _ready(state)
    length = state.engine.ctx_size if state.engine else state.encoder.max_length
    card = {"id": state.model_name, "object": "model", "created": now(), "owned_by": "lmrt", "max_model_len": length}
    adapters = state.model.adapter_names if state.engine is not None else ()
    return [card, *({**card, "id": name, "parent": state.model_name} for name in adapters)]


def _authorized_engine(state: ServerState, request: Request) -> Engine:
    _authorize(state, request)
    return _engine(state)


def _ready(state: ServerState) -> None:
    if not state.ready:
        raise busy("the model is still loading", "model_loading")


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
    return await read_json(request, state.max_body_bytes, state.body_timeout)


async def _complete(state: ServerState, request: Request, parse, answer) -> Response:
    """A generation route: the body checked into a typed request, submitted, and answered whole or
    streamed; a client that leaves cancels its generation."""
    _authorize(state, request)
    engine = _engine(state)
    body = await _json_body(state, request)
    model = state.model
    parsed = parse(body, model, state.model_name, engine.ctx_size)
    run = submit(engine, parsed, parsed.to_config(model))
    name = parsed.adapter or state.model_name  # the model id the request named
    if parsed.stream:
        return EventStream(sse(answer.stream(run, model, name)), on_disconnect=run.cancel)
    result = await unless_disconnected(request.receive, answer.whole(run, model, name), run.cancel)
    return Response(status_code=499) if result is None else JSONResponse(result)
