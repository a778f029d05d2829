"""OpenAI's Responses API: ``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``.

A Responses body is read into the chat route's body (``responses_input``) and answered by the chat
route's own parsing and answer (``chat``): one generation path. The chat completion is then shaped
as a Response (output items: a message, or function calls), streamed as the Responses events, each
with its ``sequence_number``. Answers are kept for ``previous_response_id`` (``response_store``)
unless the request says ``store: false``.
"""

from __future__ import annotations

import json
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .bridge import EventStream, submit, unless_disconnected
from .chat import ChatAnswer, parse_chat
from .errors import APIError
from .response_store import ResponseStore, StoredResponse
from .responses import new_id, now
from .responses_input import ResponsesAsk, in_responses_terms, read_responses


def register(app: FastAPI, state) -> None:
    """The Responses routes on ``app``, answering from ``state`` (app's ServerState)."""
    from .app import _authorize, _engine, _json_body  # app registers these routes once it is loaded

    store = ResponseStore(0) if state.response_store is None else state.response_store

    @app.post("/v1/responses")
    async def create(request: Request) -> Response:
        _authorize(state, request)
        engine = _engine(state)
        ask = read_responses(await _json_body(state, request), store)
        model = state.model
        try:
            parsed = parse_chat(ask.chat, model, state.model_name, engine.ctx_size)
            run = submit(engine, parsed, parsed.to_config(model))
        except APIError as e:
            raise in_responses_terms(e) from None
        name = parsed.adapter or state.model_name  # the model id the request named
        shape = ResponseShape(ask, name, store)
        if parsed.stream:
            return EventStream(_sse(shape.events(ChatAnswer.stream(run, model, name))), on_disconnect=run.cancel)
        completion = await unless_disconnected(request.receive, ChatAnswer.whole(run, model, name), run.cancel)
        if completion is None:
            return Response(status_code=499)
        return JSONResponse(shape.finish(completion["choices"][0], completion["usage"]))

    @app.get("/v1/responses/{response_id}")
    async def retrieve(response_id: str, request: Request) -> JSONResponse:
        _authorize(state, request)
        return JSONResponse(_stored(store, response_id).response)

    @app.delete("/v1/responses/{response_id}")
    async def delete(response_id: str, request: Request) -> JSONResponse:
        _authorize(state, request)
        _stored(store, response_id)
        store.delete(response_id)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})


def _stored(store: ResponseStore, response_id: str) -> StoredResponse:
    stored = store.get(response_id)
    if stored is None:
        raise APIError(404, f"no response with id '{response_id}'", "response_id", "response_not_found")
    return stored


class ResponseShape:
    """One Response: its fields from the request, its output from the chat answer, and its events."""

    def __init__(self, ask: ResponsesAsk, model_name: str, store: ResponseStore):
        self.ask, self.store = ask, store
        body = ask.body
        self.response = {
            "id": new_id("resp"), "object": "response", "created_at": now(), "status": "in_progress",
            "completed_at": None, "error": None, "incomplete_details": None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "model": model_name, "output": [], "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"), "temperature": body.get("temperature"),
            "top_p": body.get("top_p"), "tool_choice": body.get("tool_choice") or ("auto" if body.get("tools") else "none"),
            "tools": body.get("tools") or [], "text": {"format": (body.get("text") or {}).get("format") or {"type": "text"}},
            "truncation": "disabled", "store": ask.stored, "background": False, "metadata": body.get("metadata") or {},
            "reasoning": {"effort": None, "summary": None}, "service_tier": body.get("service_tier") or "default",
            "user": body.get("user"), "usage": None,
        }  # fmt: skip

    def finish(self, choice: dict, usage: dict) -> dict:
        """The whole Response for the chat answer's ``choice`` and ``usage``; stored when asked."""
        self.response.update(output=self.output(choice), usage=_usage(usage), completed_at=now())
        if choice["finish_reason"] == "length":
            self.response.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
        else:
            self.response["status"] = "completed"
        if self.ask.stored:
            said = _conversation(self.response["output"])
            self.store.put(StoredResponse(self.response, (*self.ask.earlier, *self.ask.new, *said)))
        return self.response

    def output(self, choice: dict) -> list[dict]:
        message = choice["message"]
        if message.get("tool_calls"):
            return [_function_call(c) for c in message["tool_calls"]]
        status = "incomplete" if choice["finish_reason"] == "length" else "completed"
        return [_message(message["content"] or "", status)]

    async def events(self, chunks: AsyncIterator[dict]) -> AsyncIterator[dict]:
        """The Responses events of a streamed chat answer's ``chunks``."""
        yield {"type": "response.created", "response": dict(self.response)}
        yield {"type": "response.in_progress", "response": dict(self.response)}
        text, item, reason, calls, usage = "", None, None, [], None
        async for chunk in chunks:
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                delta, reason = c["delta"], c["finish_reason"] or reason
                calls += delta.get("tool_calls") or []
                if delta.get("content"):
                    if item is None:
                        item = _message("", "in_progress")
                        for event in _message_opened(item):
                            yield event
                    text += delta["content"]
                    yield {"type": "response.output_text.delta", "item_id": item["id"], "output_index": 0,
                           "content_index": 0, "delta": delta["content"], "logprobs": []}  # fmt: skip
        message = {"role": "assistant", "content": None if calls else text, "tool_calls": calls or None}
        response = self.finish({"message": message, "finish_reason": reason}, usage)
        for index, done in enumerate(response["output"]):
            if done["type"] == "function_call":
                for event in _call_events(done, index):
                    yield event
                continue
            if item is None:
                item = _message("", "in_progress")
                for event in _message_opened(item):
                    yield event
            done["id"] = item["id"]
            part = done["content"][0]
            yield {"type": "response.output_text.done", "item_id": item["id"], "output_index": 0, "content_index": 0,
                   "text": part["text"], "logprobs": []}  # fmt: skip
            yield {"type": "response.content_part.done", "item_id": item["id"], "output_index": 0, "content_index": 0, "part": part}
            yield {"type": "response.output_item.done", "output_index": 0, "item": done}
        yield {"type": f"response.{'incomplete' if response['status'] == 'incomplete' else 'completed'}", "response": response}


def _message(text: str, status: str) -> dict:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"id": new_id("msg"), "type": "message", "role": "assistant", "status": status, "content": [part]}


def _message_opened(item: dict) -> list[dict]:
    empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    return [
        {"type": "response.output_item.added", "output_index": 0, "item": {**item, "content": []}},
        {"type": "response.content_part.added", "item_id": item["id"], "output_index": 0, "content_index": 0, "part": empty},
    ]


def _function_call(call: dict) -> dict:
    fn = call["function"]
    return {"id": new_id("fc"), "type": "function_call", "call_id": call["id"], "name": fn["name"],
            "arguments": fn["arguments"], "status": "completed"}  # fmt: skip


def _call_events(item: dict, index: int) -> list[dict]:
    """A function call's events: it comes whole (whether an answer is a call is known once it is complete)."""
    opened = {**item, "arguments": "", "status": "in_progress"}
    at = {"item_id": item["id"], "output_index": index}
    return [
        {"type": "response.output_item.added", "output_index": index, "item": opened},
        {"type": "response.function_call_arguments.delta", **at, "delta": item["arguments"]},
        {"type": "response.function_call_arguments.done", **at, "arguments": item["arguments"], "name": item["name"]},
        {"type": "response.output_item.done", "output_index": index, "item": item},
    ]


def _usage(usage: dict) -> dict:
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["total_tokens"],
    }


def _conversation(output: list[dict]) -> list[dict]:
    """A Response's output as chat messages, for the next turn's history."""
    calls = [{"id": o["call_id"], "type": "function", "function": {"name": o["name"], "arguments": o["arguments"]}}
             for o in output if o["type"] == "function_call"]  # fmt: skip
    if calls:
        return [{"role": "assistant", "content": None, "tool_calls": calls}]
    return [{"role": "assistant", "content": "".join(p["text"] for o in output for p in o["content"])}]


async def _sse(events: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Events as Server-Sent Events, numbered; an error ends the stream as an error event."""
    number = 0

    def line(event: dict) -> str:
        return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"

    try:
        async for event in events:
            yield line({**event, "sequence_number": number})
            number += 1
    except APIError as e:
        yield line({"type": "error", "code": e.code, "message": e.message, "param": e.param, "sequence_number": number})
