"""vLLM's tokenizer routes, which lm-eval's ``tokenizer_backend="remote"`` reads: ``POST /tokenize``
(a prompt, or chat messages rendered by the model's template), ``POST /detokenize`` and
``GET /tokenizer_info``; and ``GET /v1/models/{id}``, one model's card."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..runtime import ChatTemplateError, Engine
from ..runtime.checks import is_token_ids
from .errors import APIError
from .options import is_bool, read_value
from .requests import check_fields

TOKENIZE_FIELDS = {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt", "return_token_strs"}


def register(
    app: FastAPI, served: str, engine_for: Callable[[Request], Engine], json_body: Callable[[Request], Awaitable[Any]],
    cards: Callable[[Request], list[dict]],
) -> None:
    """The routes on ``app``: ``engine_for`` authorizes a request and gives the engine (or refuses),
    ``json_body`` reads its body, ``cards`` authorizes and gives the served models' cards (the base
    model's, then its adapters')."""

    @app.get("/v1/models/{model_id:path}")
    async def model_card(model_id: str, request: Request) -> JSONResponse:
        known = cards(request)
        answer = next((c for c in known if c["id"] == model_id), None)
        if answer is None:
            names = ", ".join(f"'{c['id']}'" for c in known)
            raise APIError(404, f"the model '{model_id}' does not exist; this server serves {names}", "model", "model_not_found")
        return JSONResponse(answer)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        engine = engine_for(request)
        body = await json_body(request)
        ids = _tokenized(body, engine, served)
        answer = {"count": len(ids), "max_model_len": engine.ctx_size, "tokens": ids}
        if read_value(body, "return_token_strs", is_bool, "true or false"):
            answer["token_strs"] = [engine.model.tokenizer.id_to_token(t) for t in ids]
        return JSONResponse(answer)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        engine = engine_for(request)
        body = await json_body(request)
        check_fields(body, {"model", "tokens"}, ("tokens",))
        _check_model(body, served)
        ids = body["tokens"]
        vocab = engine.model.vocab_size
        if not isinstance(ids, list) or not is_token_ids(ids, vocab):
            raise APIError(400, f"'tokens' must be a list of token ids from 0 to {vocab - 1}", "tokens")
        return JSONResponse({"prompt": engine.model.tokenizer.decode(ids, skip_special_tokens=False)})

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> JSONResponse:
        engine = engine_for(request)
        tok = engine.model.manifest.tokenizer
        tokenizer = engine.model.tokenizer
        pad = tokenizer.id_to_token(tok.pad_token_id) if tok.pad_token_id is not None else None
        return JSONResponse({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": pad,
            "bos_token_id": tok.bos_token_id, "eos_token_ids": list(tok.eos_token_ids), "pad_token_id": tok.pad_token_id,
            "chat_template": tok.chat_template, "model_max_length": engine.ctx_size,
            "vocab_size": engine.model.vocab_size,
        })  # fmt: skip


def _check_model(body: dict, served: str) -> None:
    name = read_value(body, "model", lambda v: isinstance(v, str), "a string")
    if name is not None and name != served:
        raise APIError(404, f"the model '{name}' does not exist; this server serves '{served}'", "model", "model_not_found")


def _tokenized(body: Any, engine: Engine, served: str) -> list[int]:
    """The token ids of a /tokenize body: its "prompt", or its "messages" rendered by the model's
    chat template (with the assistant's opening unless "add_generation_prompt" is false)."""
    check_fields(body, TOKENIZE_FIELDS, ())
    _check_model(body, served)
    model = engine.model
    if ("prompt" in body) == ("messages" in body):
        raise APIError(400, "give either 'prompt' or 'messages'", "prompt")
    special = read_value(body, "add_special_tokens", is_bool, "true or false")
    if "prompt" in body:
        prompt = read_value(body, "prompt", lambda v: isinstance(v, str), "a string")
        if prompt is None:
            raise APIError(400, "'prompt' must be a string", "prompt")
        return model.encode(prompt, add_special_tokens=True if special is None else special)
    if read_value(body, "add_special_tokens", is_bool, "true or false"):
        raise APIError(400, "'add_special_tokens' applies to a 'prompt': a chat template writes its own", "add_special_tokens")
    messages = body["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                and isinstance(m.get("content"), str) for m in messages):  # fmt: skip
        raise APIError(400, "'messages' must be a list of {\"role\": ..., \"content\": <text>}", "messages")
    generation = read_value(body, "add_generation_prompt", is_bool, "true or false")
    try:
        return model.chat_prompt(messages, add_generation_prompt=generation is not False)
    except ChatTemplateError as e:
        raise APIError(400, str(e), "messages") from None
