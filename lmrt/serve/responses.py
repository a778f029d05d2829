"""The shapes both generation endpoints answer with: ids, usage, log-probabilities, Server-Sent
Events, and the collected or chunked output of a run."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from ..runtime import Event, LoadedModel, TokenLogprob
from .bridge import Run, events
from .errors import APIError


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def finish_reason(reason: str | None) -> str | None:
    """lmrt's finish reasons in OpenAI's terms (a stop string is a stop)."""
    return {"stop_string": "stop"}.get(reason, reason)


def head(model_name: str, id_prefix: str, kind: str) -> dict:
    """The fields every response and chunk of one answer starts with (a new id for each answer)."""
    return {"id": new_id(id_prefix), "object": kind, "created": now(), "model": model_name}


def usage_field(run: Run) -> dict:
    """What each chunk carries when the client asked for a usage chunk: ``usage: null``."""
    return {"usage": None} if run.request.include_usage else {}


def usage(run: Run, generated: int) -> dict:
    prompt_tokens = sum(len(p) for p in run.request.prompts)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": generated,
        "total_tokens": prompt_tokens + generated,
        "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in run.submitted)},
    }


def chat_logprobs(model: LoadedModel, items: list[TokenLogprob]) -> dict:
    def entry(token: int, logprob: float) -> dict:
        text = model.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(i.token, i.logprob), "top_logprobs": [entry(t, lp) for t, lp in i.top]} for i in items]}


def completion_logprobs(model: LoadedModel, items: list[TokenLogprob], offset: int = 0) -> dict:
    tokens = [model.decode([i.token]) for i in items]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [i.logprob for i in items],
        "top_logprobs": [{model.decode([t]): lp for t, lp in i.top} for i in items],
        "text_offset": offsets,
    }


async def sse(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Chunks as Server-Sent Events; an error ends the stream as its own event."""
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    except APIError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    yield "data: [DONE]\n\n"


@dataclass
class Collected:
    """Every choice's whole output, for an answer that is not streamed."""

    texts: list[str]
    tokens: list[int]
    logprobs: list[list[TokenLogprob]]
    reasons: list[str | None]


async def collect(run: Run) -> Collected:
    count = run.choices
    out = Collected([""] * count, [0] * count, [[] for _ in range(count)], [None] * count)
    async for i, event in events(run):
        out.texts[i] += event.text
        out.tokens[i] += event.token is not None
        if event.logprob is not None:
            out.logprobs[i].append(event.logprob)
        out.reasons[i] = event.finish_reason or out.reasons[i]
    return out


async def chunks(run: Run, first: dict, choice: Callable[[int, Event], dict]) -> AsyncIterator[dict]:
    """A streamed answer's chunks, one per event that carries text, a log-probability or a finish
    reason (``choice`` builds the choice's own fields; ``first`` is ``head``), then the usage chunk
    when asked for."""
    extra = usage_field(run)
    generated = 0
    async for i, event in events(run):
        generated += event.token is not None
        if event.text or event.finish_reason or event.logprob is not None:
            body = {**choice(i, event), "finish_reason": finish_reason(event.finish_reason)}
            yield {**first, "choices": [body], **extra}
    if run.request.include_usage:
        yield {**first, "choices": [], "usage": usage(run, generated)}
