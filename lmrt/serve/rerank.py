"""``POST /v1/rerank`` (also ``/rerank`` and ``/v2/rerank``): documents ranked by their relevance to
a query, in the Jina / Cohere shape llama-server and vLLM serve, scored by a cross-encoder (a
classifier with one logit, or two labels) that reads each (query, document) as a sentence pair."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ..runtime import Encoder
from ..runtime.checks import is_int
from .bridge import unless_disconnected
from .errors import APIError
from .options import is_bool, read_value
from .requests import check_fields, check_model
from .responses import new_id

RERANK_FIELDS = {"model", "query", "documents", "top_n", "return_documents"}
MAX_DOCUMENTS = 1000  # Cohere's limit per request
PATHS = ("/v1/rerank", "/rerank", "/v2/rerank")


@dataclass(frozen=True)
class RerankRequest:
    query: str
    documents: list[str]
    top_n: int  # how many results, best first
    return_documents: bool


def parse_rerank(body: Any, served: str) -> RerankRequest:
    check_fields(body, RERANK_FIELDS, ("model", "query", "documents"))
    check_model(body, served)
    query = read_value(body, "query", lambda v: isinstance(v, str) and v, "a non-empty string")
    given = body["documents"]
    if not isinstance(given, list) or not given:
        raise APIError(400, "'documents' must be a non-empty list of strings or {\"text\": ...} objects", "documents")
    if len(given) > MAX_DOCUMENTS:
        raise APIError(400, f"'documents' holds {len(given)} documents, more than {MAX_DOCUMENTS}", "documents")
    documents = []
    for i, d in enumerate(given):
        text = d.get("text") if isinstance(d, dict) and set(d) == {"text"} else d
        if not isinstance(text, str):
            raise APIError(400, f"documents[{i}] must be a string or {{\"text\": ...}}", "documents")
        documents.append(text)
    top_n = read_value(body, "top_n", lambda v: is_int(v) and v >= 1, "a positive integer")
    keep = read_value(body, "return_documents", is_bool, "true or false")
    return RerankRequest(query, documents, min(top_n or len(documents), len(documents)), keep is not False)


def rerank_response(request: RerankRequest, scores, tokens: int, served: str) -> dict:
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))[: request.top_n]
    results = []
    for i in order:
        result = {"index": i, "relevance_score": float(scores[i])}
        if request.return_documents:
            result["document"] = {"text": request.documents[i]}
        results.append(result)
    return {"id": new_id("rerank"), "model": served, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "results": results}


def _cross_encoder(state) -> Encoder:
    encoder = state.encoder
    if encoder is None:
        why = "a generation model, which does not rerank: serve a cross-encoder (a classifier of sentence pairs)"
    elif encoder.task != "classify":
        why = "an embedding model, which does not rerank: serve a cross-encoder (a classifier of sentence pairs)"
    elif encoder.dimension > 2:
        why = f"a classifier of {encoder.dimension} labels; a cross-encoder has one logit (or two labels)"
    else:
        return encoder
    raise APIError(400, f"this server serves {why}", code="model_not_reranker")


def register(app: FastAPI, state) -> None:
    """The rerank routes on ``app``, answering from ``state`` (app's ServerState)."""
    from .app import _authorize, _json_body, _ready  # app registers these routes once it is loaded

    async def rerank(request: Request) -> Response:
        _authorize(state, request)
        _ready(state)
        encoder = _cross_encoder(state)
        parsed = parse_rerank(await _json_body(state, request), state.model_name)
        pairs = [(parsed.query, d) for d in parsed.documents]
        ids, types = encoder.tokenize_pairs(pairs)
        work = asyncio.to_thread(encoder.pair_scores_of_ids, ids, types)
        scores = await unless_disconnected(request.receive, work, lambda: None)
        if scores is None:
            return Response(status_code=499)
        return JSONResponse(rerank_response(parsed, scores, sum(len(i) for i in ids), state.model_name))

    for path in PATHS:
        app.add_api_route(path, rerank, methods=["POST"])
