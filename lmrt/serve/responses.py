"""The shapes both generation endpoints answer with: ids, usage, log-probabilities, Server-Sent
Events, and the collected or chunked output of a run."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from ..runtime import Event, LoadedModel, Score, TokenLogprob
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
    return {
        "tokens": tokens,
        "token_logprobs": [i.logprob for i in items],
        "top_logprobs": [{model.decode([t]): lp for t, lp in i.top} for i in items],
        "text_offset": _offsets(tokens, offset),
    }


def prompt_completion_logprobs(model: LoadedModel, score: Score, top: int) -> dict:
    """An echoed prompt's log-probabilities in the completion shape: the first token has none (no
    token comes before it), then each token's given the ones before it and ``top`` alternatives."""
    alternatives = score.top or ((),) * score.num_scored
    return {
        "tokens": [model.decode([t]) for t in score.token_ids],
        "token_logprobs": [None, *(float(lp) for lp in score.logprobs)],
        "top_logprobs": [None, *({model.decode([t]): lp for t, lp in best[:top]} for best in alternatives)],
        "text_offset": _offsets([model.decode([t]) for t in score.token_ids], 0),
    }


def joined_logprobs(first: dict, then: dict) -> dict:
    """Two completion-shaped log-probability objects, one after the other."""
    return {key: first[key] + then[key] for key in first}


def vllm_prompt_logprobs(model: LoadedModel, score: Score, top: int) -> list:
    """vLLM's ``prompt_logprobs``: None for the first token, then for each prompt token its own
    logprob and rank and its ``top`` likeliest alternatives', by token id."""
    alternatives = score.top or ((),) * score.num_scored
    out: list = [None]
    for token, logprob, rank, best in zip(score.token_ids[1:], score.logprobs, score.ranks, alternatives):
        entry = {token: {"logprob": float(logprob), "rank": int(rank), "decoded_token": model.decode([token])}}
        for place, (t, lp) in enumerate(best[:top], 1):
            entry.setdefault(t, {"logprob": lp, "rank": place, "decoded_token": model.decode([t])})
        out.append(entry)
    return out


def _offsets(pieces: list[str], start: int) -> list[int]:
    """Where each of ``pieces`` starts in their concatenation placed at ``start``."""
    offsets, at = [], start
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    return offsets


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
