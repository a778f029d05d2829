"""``POST /v1/completions``: prompts as text or token ids, and the text completion responses and
chunks."""

from __future__ import annotations

from typing import Any, AsyncIterator

from ..runtime import Event, LoadedModel
from ..runtime.checks import is_int
from . import responses
from .bridge import Run
from .errors import APIError
from .options import read_options, read_value
from .requests import (
    GENERATION_FIELDS, CompletionRequest, check_fields, check_model, read_generation, read_inputs, read_logprobs,
)

COMPLETION_FIELDS = GENERATION_FIELDS | {"prompt", "logprobs", "echo", "suffix", "best_of"}
DEFAULT_MAX_TOKENS = 16  # OpenAI's


def parse_completion(body: Any, model: LoadedModel, served: str, ctx_size: int) -> CompletionRequest:
    check_fields(body, COMPLETION_FIELDS, ("model", "prompt"))
    check_model(body, served)
    if body.get("echo"):
        raise APIError(400, "'echo' is not supported", "echo")
    if body.get("suffix") is not None:
        raise APIError(400, "'suffix' is not supported", "suffix")
    best_of = read_value(body, "best_of", is_int, "an integer")
    if best_of is not None and best_of != (body.get("n") or 1):
        raise APIError(400, "'best_of' other than 'n' is not supported", "best_of")
    vocab = model.manifest.architecture.vocab_size
    prompts = read_inputs(body["prompt"], "prompt", vocab, lambda texts: [model.encode(t) for t in texts])
    logprobs = read_logprobs(body, "logprobs")
    options, params = read_options(body, vocab)
    fields = read_generation(body, options, params, prompts, ctx_size, "prompt", DEFAULT_MAX_TOKENS)
    return CompletionRequest(**fields, logprobs=logprobs)


class TextAnswer:
    """Completion (text) responses and chunks."""

    @staticmethod
    async def whole(run: Run, model: LoadedModel, model_name: str) -> dict:
        got = await responses.collect(run)
        choices = [
            {
                "index": i,
                "text": got.texts[i],
                "logprobs": responses.completion_logprobs(model, got.logprobs[i]) if run.request.logprobs is not None else None,
                "finish_reason": responses.finish_reason(got.reasons[i]),
            }
            for i in range(run.choices)
        ]
        head = responses.head(model_name, "cmpl", "text_completion")
        return {**head, "choices": choices, "usage": responses.usage(run, sum(got.tokens))}

    @staticmethod
    async def stream(run: Run, model: LoadedModel, model_name: str) -> AsyncIterator[dict]:
        offsets = [0] * run.choices

        def choice(i: int, event: Event) -> dict:
            logprobs = None
            if event.logprob is not None:
                logprobs = responses.completion_logprobs(model, [event.logprob], offsets[i])
            offsets[i] += len(event.text)
            return {"index": i, "text": event.text, "logprobs": logprobs}

        async for chunk in responses.chunks(run, responses.head(model_name, "cmpl", "text_completion"), choice):
            yield chunk
