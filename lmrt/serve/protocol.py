"""OpenAI's request and response shapes: request bodies checked and turned into generation settings,
engine events turned into response objects and stream chunks.

Every field a request may carry is listed here; any other field is refused with a 400 that names it,
so no setting is ever silently ignored. Beyond OpenAI's fields, the GenerationConfig options that make
sense for a server are accepted as extras (``top_k``, ``min_p``, ``repetition_penalty``,
``no_repeat_ngram_size``, ``min_tokens``, ``stop_token_ids``, ``ignore_eos``), under the names vLLM
uses.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..runtime import ConfigError, GenerationConfig, Generator
from ..runtime.decoding import TokenLogprob

MAX_LOGPROBS = 20


class APIError(Exception):
    """An error answered with OpenAI's JSON error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Parsed:
    """A checked request: token ids per prompt, the settings, and how to answer."""

    prompts: list[list[int]]
    config: GenerationConfig
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: none; k: the chosen token's and k alternatives'


# Fields of both endpoints, with OpenAI's names; the extras use vLLM's names.
_COMMON = {
    "model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
    "presence_penalty", "frequency_penalty", "logit_bias", "user",
    "top_k", "min_p", "repetition_penalty", "no_repeat_ngram_size", "min_tokens", "stop_token_ids", "ignore_eos",
}  # fmt: skip
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format"}
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "echo", "suffix", "best_of"}
# GenerationConfig field -> request field, for errors found by GenerationConfig itself
_PARAM = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "num_return_sequences": "n"}


def _field(body: dict, name: str, kinds: tuple[type, ...], what: str) -> Any:
    """``body[name]`` if it is one of ``kinds`` (None when absent or null), else a 400."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds:
        raise APIError(400, f"'{name}' must be {what}", name)
    if not isinstance(value, kinds):
        raise APIError(400, f"'{name}' must be {what}", name)
    if isinstance(value, float) and not math.isfinite(value):
        raise APIError(400, f"'{name}' must be {what}", name)
    return value


def _check_fields(body: Any, allowed: set[str], required: tuple[str, ...]) -> None:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise APIError(400, f"unsupported field '{unknown[0]}'", unknown[0], "unsupported_parameter")
    for name in required:
        if body.get(name) is None:
            raise APIError(400, f"'{name}' is required", name, "missing_required_parameter")


def check_model(body: dict, served: str) -> None:
    name = _field(body, "model", (str,), "a string")
    if name != served:
        raise APIError(404, f"the model '{name}' does not exist; this server serves '{served}'", "model", "model_not_found")


def _settings(body: dict, gen: Generator, max_tokens: int | None, logprobs: int | None, ctx_size: int, prompts) -> Parsed:
    """The settings shared by both endpoints, checked, as a GenerationConfig."""
    number, integer = (int, float), (int,)
    options: dict[str, Any] = {
        "temperature": _field(body, "temperature", number, "a number"),
        "top_p": _field(body, "top_p", number, "a number"),
        "seed": _field(body, "seed", integer, "an integer"),
        "presence_penalty": _field(body, "presence_penalty", number, "a number"),
        "frequency_penalty": _field(body, "frequency_penalty", number, "a number"),
        "top_k": _field(body, "top_k", integer, "an integer"),
        "min_p": _field(body, "min_p", number, "a number"),
        "repetition_penalty": _field(body, "repetition_penalty", number, "a number"),
        "no_repeat_ngram_size": _field(body, "no_repeat_ngram_size", integer, "an integer"),
        "min_new_tokens": _field(body, "min_tokens", integer, "an integer"),
    }
    n = _field(body, "n", integer, "an integer")
    if n is not None:
        if n < 1:
            raise APIError(400, "'n' must be at least 1", "n")
        options["num_return_sequences"] = n
        if n > 1 and options["temperature"] is None and gen.config().temperature == 0:
            raise APIError(400, "'n' above 1 needs sampling: set a temperature above 0", "n")
    if options["temperature"] is not None and options["temperature"] > 2:
        raise APIError(400, "'temperature' must be between 0 and 2", "temperature")
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise APIError(400, "'stop' must be a non-empty string or a list of them", "stop")
        options["stop"] = stop
    vocab = gen.manifest.architecture.vocab_size
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(_is_token(t, vocab) for t in stop_ids):
        raise APIError(400, f"'stop_token_ids' must be a list of token ids below {vocab}", "stop_token_ids")
    ignore_eos = _field(body, "ignore_eos", (bool,), "true or false")
    if stop_ids or ignore_eos:  # stop ids come on top of the end-of-sequence ids, unless those are ignored
        options["stop_token_ids"] = [*(() if ignore_eos else gen.manifest.tokenizer.eos_token_ids), *stop_ids]
    bias = body.get("logit_bias")
    if bias is not None:
        options["logits_processors"] = [_logit_bias(bias, vocab)]
    longest = max(len(p) for p in prompts)
    room = ctx_size - longest
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        raise APIError(
            400,
            f"this model's context per request is {ctx_size} tokens, but the prompt has {longest} and "
            f"max_tokens asks for {max_tokens} more",
            "max_tokens", "context_length_exceeded",
        )  # fmt: skip
    options["max_new_tokens"] = max_tokens
    try:
        config = gen.config(**options)
    except ConfigError as e:
        param = _PARAM.get(e.field, e.field)
        raise APIError(400, e.named(f"'{param}'"), param) from None
    stream = _field(body, "stream", (bool,), "true or false") or False
    include_usage = False
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not stream:
            raise APIError(400, "'stream_options' is only allowed with 'stream': true", "stream_options")
        if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}:
            raise APIError(400, "'stream_options' may hold 'include_usage' only", "stream_options")
        include_usage = _field(stream_options, "include_usage", (bool,), "true or false") or False
    return Parsed(prompts, config, stream, include_usage, logprobs)


def _is_token(value: Any, vocab: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab


def _logit_bias(bias: Any, vocab: int):
    """OpenAI's logit_bias ({"token id": bias from -100 to 100}) as a logits processor."""
    if not isinstance(bias, dict):
        raise APIError(400, "'logit_bias' must map token ids to numbers", "logit_bias")
    ids, values = [], []
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < vocab):
            raise APIError(400, f"'logit_bias' key {key!r} is not a token id below {vocab}", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise APIError(400, "'logit_bias' values must be numbers from -100 to 100", "logit_bias")
        ids.append(int(key))
        values.append(float(value))

    def logit_bias(token_ids, logits):
        logits[ids] += values
        return logits

    return logit_bias


def _max_tokens(body: dict, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = _field(body, name, (int,), "a positive integer")
        if value is not None:
            if value < 1:
                raise APIError(400, f"'{name}' must be a positive integer", name)
            return value
    return None


def parse_chat(body: Any, gen: Generator, served: str, ctx_size: int) -> Parsed:
    _check_fields(body, CHAT_FIELDS, ("model", "messages"))
    check_model(body, served)
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    rendered = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise APIError(400, f"messages[{i}] needs a 'role' and a 'content'", "messages")
        rendered.append({**m, "content": _text_content(m["content"], i)})
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise APIError(400, "'response_format' other than {\"type\": \"text\"} is not supported yet", "response_format")
    logprobs = None
    if _field(body, "logprobs", (bool,), "true or false"):
        top = _field(body, "top_logprobs", (int,), "an integer") or 0
        if not 0 <= top <= MAX_LOGPROBS:
            raise APIError(400, f"'top_logprobs' must be from 0 to {MAX_LOGPROBS}", "top_logprobs")
        logprobs = top
    elif body.get("top_logprobs") is not None:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    from ..runtime import ChatTemplateError

    try:
        prompt = gen.chat_prompt(rendered)
    except ChatTemplateError as e:
        raise APIError(400, str(e), "messages") from None
    _check_prompt(prompt, ctx_size, "messages")
    return _settings(body, gen, _max_tokens(body, ("max_completion_tokens", "max_tokens")), logprobs, ctx_size, [prompt])


def _text_content(content: Any, i: int) -> str:
    """A message's content: a string, or a list of text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        raise APIError(400, f"messages[{i}]: only text content parts are supported", "messages")
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")


def parse_completion(body: Any, gen: Generator, served: str, ctx_size: int) -> Parsed:
    _check_fields(body, COMPLETION_FIELDS, ("model", "prompt"))
    check_model(body, served)
    if body.get("echo"):
        raise APIError(400, "'echo' is not supported", "echo")
    if body.get("suffix") is not None:
        raise APIError(400, "'suffix' is not supported", "suffix")
    best_of = _field(body, "best_of", (int,), "an integer")
    if best_of is not None and best_of != (body.get("n") or 1):
        raise APIError(400, "'best_of' other than 'n' is not supported", "best_of")
    prompts = _prompts(body["prompt"], gen)
    for p in prompts:
        _check_prompt(p, ctx_size, "prompt")
    logprobs = _field(body, "logprobs", (int,), "an integer")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"'logprobs' must be from 0 to {MAX_LOGPROBS}", "logprobs")
    max_tokens = _max_tokens(body, ("max_tokens",))
    return _settings(body, gen, 16 if max_tokens is None else max_tokens, logprobs, ctx_size, prompts)


def _prompts(prompt: Any, gen: Generator) -> list[list[int]]:
    """A completion's prompt: a string, a list of strings, a list of token ids, or a list of those."""
    vocab = gen.manifest.architecture.vocab_size
    bad = APIError(400, "'prompt' must be a string, a list of strings, or token ids (a list, or a list of lists)", "prompt")
    if isinstance(prompt, str):
        return [gen.encode(prompt)]
    if not isinstance(prompt, list) or not prompt:
        raise bad
    if all(isinstance(p, str) for p in prompt):
        return [gen.encode(p) for p in prompt]
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = [prompt]
    if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt):
        if not all(_is_token(t, vocab) for p in prompt for t in p):
            raise APIError(400, f"'prompt' token ids must be from 0 to {vocab - 1}", "prompt")
        return [list(p) for p in prompt]
    raise bad


def _check_prompt(ids: list[int], ctx_size: int, param: str) -> None:
    if not ids:
        raise APIError(400, "the prompt is empty", param)
    if len(ids) >= ctx_size:
        raise APIError(
            400, f"the prompt has {len(ids)} tokens, more than fit this server's context of {ctx_size} per request",
            param, "context_length_exceeded",
        )  # fmt: skip


# --- responses ------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def finish_reason(reason: str | None) -> str | None:
    """lmrt's finish reasons in OpenAI's terms (a stop string is a stop)."""
    return {"stop_string": "stop"}.get(reason, reason)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def chat_logprobs(gen: Generator, items: list[TokenLogprob]) -> dict:
    def entry(token: int, logprob: float) -> dict:
        text = gen.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(i.token, i.logprob), "top_logprobs": [entry(t, lp) for t, lp in i.top]} for i in items]}


def completion_logprobs(gen: Generator, items: list[TokenLogprob], offset: int = 0) -> dict:
    tokens = [gen.decode([i.token]) for i in items]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [i.logprob for i in items],
        "top_logprobs": [{gen.decode([t]): lp for t, lp in i.top} for i in items],
        "text_offset": offsets,
    }


# --- embeddings -----------------------------------------------------------------------------

EMBEDDING_FIELDS = {"model", "input", "encoding_format", "dimensions", "user"}


@dataclass
class EmbeddingRequest:
    ids: list[list[int]]  # token ids per input, special tokens included
    base64: bool


def parse_embeddings(body: Any, encoder, served: str) -> EmbeddingRequest:
    """An embeddings request: ``input`` a string, strings, token ids or lists of them."""
    _check_fields(body, EMBEDDING_FIELDS, ("model", "input"))
    check_model(body, served)
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise APIError(400, "'encoding_format' must be 'float' or 'base64'", "encoding_format")
    dimensions = _field(body, "dimensions", (int,), "an integer")
    if dimensions is not None and dimensions != encoder.dimension:
        raise APIError(400, f"'dimensions' cannot change this model's embedding size ({encoder.dimension})", "dimensions")
    given = body["input"]
    vocab = encoder.manifest.architecture.vocab_size
    bad = APIError(400, "'input' must be a string, a list of strings, or token ids (a list, or a list of lists)", "input")
    if isinstance(given, str):
        given = [given]
    if not isinstance(given, list) or not given:
        raise bad
    if all(isinstance(t, str) for t in given):
        try:
            ids = encoder.tokenize(given)
        except ValueError as e:
            raise APIError(400, str(e), "input") from None
    else:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in given):
            given = [given]
        if not all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in given):
            raise bad
        if not all(_is_token(t, vocab) for p in given for t in p):
            raise APIError(400, f"'input' token ids must be from 0 to {vocab - 1}", "input")
        too_long = [i for i, p in enumerate(given) if len(p) > encoder.max_length]
        if too_long:
            raise APIError(400, f"input {too_long[0]} has {len(given[too_long[0]])} tokens, more than the model's {encoder.max_length}",
                           "input", "context_length_exceeded")  # fmt: skip
        ids = [list(p) for p in given]
    return EmbeddingRequest(ids, fmt == "base64")


def embeddings_response(vectors, request: EmbeddingRequest, served: str) -> dict:
    import base64

    import numpy as np

    data = []
    for i, v in enumerate(vectors):
        v = np.asarray(v, dtype="<f4")
        value = base64.b64encode(v.tobytes()).decode("ascii") if request.base64 else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = sum(len(p) for p in request.ids)
    return {"object": "list", "data": data, "model": served, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
