"""``POST /v1/completions``: prompts as text or token ids, and the text completion responses and
chunks; ``echo`` starts each answer with its prompt (and, with ``logprobs``, the prompt tokens'
log-probabilities), and ``max_tokens`` 0 with ``echo`` only scores the prompts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator

from ..runtime import Event, LoadedModel
from ..runtime.checks import is_int
from . import responses
from .bridge import Run
from .errors import APIError
from .options import is_bool, read_options, read_value
from .requests import (
    GENERATION_FIELDS, CompletionRequest, check_fields, check_model, read_generation, read_inputs, read_logprobs,
)

COMPLETION_FIELDS = GENERATION_FIELDS | {"prompt", "logprobs", "echo", "suffix", "best_of"}
DEFAULT_MAX_TOKENS = 16  # OpenAI's


@dataclass(frozen=True)
class EchoingRequest(CompletionRequest):
    """A completion request that echoes its prompts: ``echoed`` holds each prompt's text."""

    echoed: tuple[str, ...] = ()


def parse_completion(body: Any, model: LoadedModel, served: str, ctx_size: int) -> CompletionRequest:
    check_fields(body, COMPLETION_FIELDS, ("model", "prompt"))
    adapter = check_model(body, served, model.adapter_names)
    echo = read_value(body, "echo", is_bool, "true or false") or False
    if body.get("suffix") is not None:
        raise APIError(400, "'suffix' is not supported", "suffix")
    best_of = read_value(body, "best_of", is_int, "an integer")
    if best_of is not None and best_of != (body.get("n") or 1):
        raise APIError(400, "'best_of' other than 'n' is not supported", "best_of")
    generates = not (is_int(body.get("max_tokens")) and body["max_tokens"] == 0)
    if not generates:
        if not echo:
            raise APIError(400, "'max_tokens' 0 generates nothing: it needs 'echo': true, to score the prompt", "max_tokens")
        body = {**body, "max_tokens": 1}  # the prompt must still fit a slot's context
    vocab = model.manifest.architecture.vocab_size
    prompts = read_inputs(body["prompt"], "prompt", vocab, lambda texts: [model.encode(t) for t in texts])
    logprobs = read_logprobs(body, "logprobs")
    options, params = read_options(body, vocab)
    fields = {**read_generation(body, options, params, prompts, ctx_size, "prompt", DEFAULT_MAX_TOKENS), "adapter": adapter}
    if not echo:
        return CompletionRequest(**fields, logprobs=logprobs)
    given = body["prompt"]
    texts = [given] if isinstance(given, str) else given if all(isinstance(t, str) for t in given) else None
    echoed = tuple(texts) if texts is not None else tuple(model.decode(p) for p in prompts)
    return EchoingRequest(**fields, logprobs=logprobs, echo=True, generates=generates, echoed=echoed)


class TextAnswer:
    """Completion (text) responses and chunks."""

    @staticmethod
    async def whole(run: Run, model: LoadedModel, model_name: str) -> dict:
        request = run.request
        scores = await run.scores()
        got = await responses.collect(run)
        choices = []
        for i in range(run.choices):
            start = _start(run, model, scores, i)
            logprobs = None
            if request.logprobs is not None:
                generated = responses.completion_logprobs(model, got.logprobs[i], len(start["text"]))
                logprobs = responses.joined_logprobs(start["logprobs"], generated) if start["logprobs"] else generated
            reason = responses.finish_reason(got.reasons[i]) if request.generates else "length"
            choice = {"index": i, "text": start["text"] + got.texts[i], "logprobs": logprobs, "finish_reason": reason}
            choices.append({**choice, **start["extra"]})
        head = responses.head(model_name, "cmpl", "text_completion")
        return {**head, "choices": choices, "usage": responses.usage(run, sum(got.tokens))}

    @staticmethod
    async def stream(run: Run, model: LoadedModel, model_name: str) -> AsyncIterator[dict]:
        head, extra = responses.head(model_name, "cmpl", "text_completion"), responses.usage_field(run)
        offsets = [0] * run.choices
        scores = await run.scores()
        if run.request.echo or run.request.prompt_logprobs is not None:  # the echoed prompts and their log-probabilities come first
            for i in range(run.choices):
                start = _start(run, model, scores, i)
                offsets[i] = len(start["text"])
                body = {"index": i, "text": start["text"], "logprobs": start["logprobs"], "finish_reason": None, **start["extra"]}
                yield {**head, "choices": [body], **extra}
        if not run.request.generates:
            for i in range(run.choices):
                yield {**head, "choices": [{"index": i, "text": "", "logprobs": None, "finish_reason": "length"}], **extra}
            if run.request.include_usage:
                yield {**head, "choices": [], "usage": responses.usage(run, 0)}
            return

        def choice(i: int, event: Event) -> dict:
            logprobs = None
            if event.logprob is not None:
                logprobs = responses.completion_logprobs(model, [event.logprob], offsets[i])
            offsets[i] += len(event.text)
            return {"index": i, "text": event.text, "logprobs": logprobs}

        async for chunk in responses.chunks(run, head, choice):
            yield chunk


def _start(run: Run, model: LoadedModel, scores: list, i: int) -> dict:
    """What choice ``i``'s answer starts with: the echoed prompt ("text") and its log-probabilities
    ("logprobs", with ``logprobs`` asked for), and vLLM's "prompt_logprobs" ("extra") when asked."""
    request, prompt = run.request, i // run.n
    echo = request.echo
    text = request.echoed[prompt] if echo else ""
    logprobs = None
    if echo and request.logprobs is not None:
        logprobs = responses.prompt_completion_logprobs(model, scores[prompt], request.logprobs)
    extra = {}
    if request.prompt_logprobs is not None:
        extra["prompt_logprobs"] = responses.vllm_prompt_logprobs(model, scores[prompt], request.prompt_logprobs)
    return {"text": text, "logprobs": logprobs, "extra": extra}
