"""OpenAI's request and response shapes: request bodies checked and turned into generation settings,
engine events turned into response objects and stream chunks.

Every field a request may carry is listed here; any other field is refused with a 400 that names it,
so no setting is ever silently ignored. Beyond OpenAI's fields, the GenerationConfig options that make
sense for a server are accepted as extras (``top_k``, ``min_p``, ``repetition_penalty``,
``no_repeat_ngram_size``, ``min_tokens``, ``stop_token_ids``, ``ignore_eos``), under the names vLLM
uses.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..runtime import ConfigError, GenerationConfig, Generator
from ..runtime.request import TokenLogprob

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
    tools: tuple[str, ...] | None = None  # the functions an answer may call (its JSON is then a call)
    params: dict[str, str] | None = None  # GenerationConfig field -> the request field that set it


# Fields of both endpoints, with OpenAI's names; the extras use vLLM's names.
_COMMON = {
    "model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
    "presence_penalty", "frequency_penalty", "logit_bias", "user",
    "top_k", "min_p", "repetition_penalty", "no_repeat_ngram_size", "min_tokens", "stop_token_ids", "ignore_eos",
}  # fmt: skip
CHAT_FIELDS = _COMMON | {
    "messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format", "tools", "tool_choice",
}  # fmt: skip
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


def _settings(
    body: dict, gen: Generator, max_tokens: int | None, logprobs: int | None, ctx_size: int, prompts,
    constraint: dict | None = None, params: dict[str, str] | None = None,
) -> Parsed:
    """The settings shared by both endpoints, checked, as a GenerationConfig. ``constraint``: the
    structured-output option (from response_format or tools), ``params`` the request fields that
    set such options, for errors."""
    number, integer = (int, float), (int,)
    options: dict[str, Any] = {
        **(constraint or {}),
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
        raise config_error(e, params) from None
    stream = _field(body, "stream", (bool,), "true or false") or False
    include_usage = False
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not stream:
            raise APIError(400, "'stream_options' is only allowed with 'stream': true", "stream_options")
        if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}:
            raise APIError(400, "'stream_options' may hold 'include_usage' only", "stream_options")
        include_usage = _field(stream_options, "include_usage", (bool,), "true or false") or False
    return Parsed(prompts, config, stream, include_usage, logprobs, params=params)


def config_error(e: ConfigError, params: dict[str, str] | None = None) -> APIError:
    """A 400 for a bad generation option, naming the request field that set it."""
    param = (params or {}).get(e.field) or _PARAM.get(e.field, e.field)
    return APIError(400, e.named(f"'{param}'"), param)


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
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or ("content" not in m and "tool_calls" not in m):
            raise APIError(400, f"messages[{i}] needs a 'role' and a 'content'", "messages")
        rendered.append({**m, "content": _message_text(m, i)})
    constraint, params = _response_format(body.get("response_format"))
    tools = parse_tools(body.get("tools"), body.get("tool_choice"))
    if tools is not None:
        if constraint and tools.constraint:
            raise APIError(400, "'response_format' cannot be combined with 'tools' unless 'tool_choice' is \"none\"", "response_format")
        if tools.constraint:
            constraint, params = tools.constraint, {name: "tools" for name in tools.constraint}
        rendered = with_tools_described(rendered, tools.functions)
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
    parsed = _settings(
        body, gen, _max_tokens(body, ("max_completion_tokens", "max_tokens")), logprobs, ctx_size, [prompt], constraint, params
    )  # fmt: skip
    if tools is not None and tools.constraint:
        if parsed.stream and logprobs is not None:
            raise APIError(400, "'logprobs' are not streamed with 'tools': the answer comes whole", "logprobs")
        parsed.tools = tuple(tools.functions)
    return parsed


def _message_text(m: dict, i: int) -> str:
    """What a message says: its text, or for an assistant's earlier tool calls, those calls as the
    JSON the model writes for them."""
    calls = m.get("tool_calls")
    if calls:
        if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls):
            raise APIError(400, f"messages[{i}].tool_calls must be a list of function calls", "messages")
        written = []
        for c in calls:
            arguments = c["function"].get("arguments", "{}")
            try:
                arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
            except json.JSONDecodeError:
                raise APIError(400, f"messages[{i}].tool_calls arguments must be JSON", "messages") from None
            written.append(json.dumps({"name": c["function"].get("name"), "arguments": arguments}, ensure_ascii=False))
        return "\n".join(written)
    return _text_content(m.get("content"), i)


def _response_format(fmt: Any) -> tuple[dict, dict]:
    """The constraint OpenAI's response_format asks for, and which request field set it."""
    if fmt is None or fmt == {"type": "text"}:
        return {}, {}
    bad = APIError(
        400, "'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
        "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}", "response_format",
    )  # fmt: skip
    if not isinstance(fmt, dict):
        raise bad
    if fmt.get("type") == "json_object" and set(fmt) == {"type"}:
        return {"json_schema": {"type": "object"}}, {"json_schema": "response_format"}
    spec = fmt.get("json_schema")
    if fmt.get("type") != "json_schema" or set(fmt) != {"type", "json_schema"} or not isinstance(spec, dict):
        raise bad
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, (dict, bool)):
        raise APIError(400, "'response_format.json_schema.schema' must be a JSON schema object", "response_format")
    return {"json_schema": schema}, {"json_schema": "response_format"}


@dataclass
class Tools:
    """A request's functions (name -> parameter schema) and the constraint its tool_choice asks for."""

    functions: dict[str, dict]
    constraint: dict  # empty: the model answers freely ("none")


def parse_tools(tools: Any, choice: Any) -> Tools | None:
    """OpenAI's ``tools`` and ``tool_choice``. "required" or a named function: the answer is a call,
    JSON ``{"name": ..., "arguments": {...}}`` matching a function's parameters; "auto" (the default):
    a call, or text that does not start with "{"; "none": free text."""
    if tools is None:
        if choice is not None:
            raise APIError(400, "'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise APIError(400, "'tools' must be a non-empty list of functions", "tools")
    functions: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}", "tools")
        parameters = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        functions[fn["name"]] = {"parameters": parameters, "description": fn.get("description", "")}
    choice = "auto" if choice is None else choice
    if isinstance(choice, dict):
        name = choice.get("function", {}).get("name") if isinstance(choice.get("function"), dict) else None
        if choice.get("type") != "function" or name not in functions:
            raise APIError(400, "'tool_choice' names no function of 'tools'", "tool_choice")
        return Tools(functions, {"json_schema": _call_schema({name: functions[name]})})
    if choice == "none":
        return Tools(functions, {})
    if choice == "required":
        return Tools(functions, {"json_schema": _call_schema(functions)})
    if choice == "auto":
        schema = json.dumps(_call_schema(functions))
        return Tools(functions, {"grammar": f"start: call | text\ncall: %json {schema}\ntext: /[^{{\\s][\\s\\S]*/"})
    raise APIError(400, "'tool_choice' must be \"none\", \"auto\", \"required\" or a function", "tool_choice")


def _call_schema(functions: dict[str, dict]) -> dict:
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": spec["parameters"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name, spec in functions.items()
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def with_tools_described(messages: list[dict], functions: dict[str, dict]) -> list[dict]:
    """``messages`` with the functions described in the system message (added when there is none),
    since a chat template may have no place for them."""
    listed = "\n".join(
        json.dumps({"name": n, "description": f["description"], "parameters": f["parameters"]}, ensure_ascii=False)
        for n, f in functions.items()
    )
    text = (
        "You can call these functions:\n" + listed + "\nTo call one, answer with only a JSON object "
        '{"name": <function name>, "arguments": <its arguments>}.'
    )
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def tool_calls(text: str, tools: tuple[str, ...]) -> list[dict] | None:
    """OpenAI's tool_calls for an answer that is a call of one of ``tools``, else None (text)."""
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or call.get("name") not in tools or not isinstance(call.get("arguments"), dict):
        return None
    arguments = json.dumps(call["arguments"], ensure_ascii=False)
    return [{"id": new_id("call"), "type": "function", "function": {"name": call["name"], "arguments": arguments}}]


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
