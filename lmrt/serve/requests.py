"""The typed request boundary: a request body is checked once, here, into a frozen request object.

Every field a request may carry is known; any other field is refused with a 400 that names it, so no
setting is ever silently ignored. The generation options are GenerationConfig's own (``options``);
a request's ``to_config(model)`` makes them a GenerationConfig over the model's defaults. What a
request object holds is valid: the layers below it check nothing again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..runtime import ConfigError, GenerationConfig, LoadedModel
from ..runtime.checks import is_int, is_token_ids
from .errors import APIError, config_error
from .options import DEFAULT_PARAMS, REQUEST_FIELDS, GenerationOptions, is_bool, option_values, read_value

MAX_LOGPROBS = 20
MAX_METADATA_KEYS = 16  # OpenAI's
MAX_CHOICES = 128  # OpenAI's most choices per prompt
# Standard fields that change nothing in the answer: accepted once their type is right.
PASSIVE_FIELDS = {
    "store": (is_bool, "true or false"),
    "user": (lambda v: isinstance(v, str), "a string"),
    "service_tier": (lambda v: isinstance(v, str), "a string"),
    "metadata": (lambda v: isinstance(v, dict) and len(v) <= MAX_METADATA_KEYS
                 and all(isinstance(x, str) for x in (*v.keys(), *v.values())),
                 f"an object of at most {MAX_METADATA_KEYS} string keys with string values"),
}  # fmt: skip
# The request fields of both generation endpoints besides the generation options.
GENERATION_FIELDS = {"model", "stream", "stream_options", "ignore_eos", "prompt_logprobs", *PASSIVE_FIELDS, *REQUEST_FIELDS}


@dataclass(frozen=True)
class GenerationRequest:
    """A checked generation request: token ids per prompt, the options it set, and how to answer."""

    prompts: list[list[int]]
    options: GenerationOptions  # the options the request set (None: the model's default)
    params: Mapping[str, str]  # GenerationConfig field -> the request field that set it
    stream: bool
    include_usage: bool
    ignore_eos: bool
    logprobs: int | None  # None: none; k: the chosen token's and k alternatives'
    prompt_logprobs: int | None = None  # vLLM's: each prompt token's log-probability and k alternatives'
    echo: bool = False  # the answer starts with the prompt (with its log-probabilities under ``logprobs``)
    generates: bool = True  # False: the prompts are only scored (max_tokens 0 with echo)
    adapter: str | None = None  # the LoRA adapter the request's ``model`` names (None: the base model)

    @property
    def n(self) -> int:
        """Choices per prompt."""
        return self.options.num_return_sequences or 1

    @property
    def prompt_top(self) -> int | None:
        """How many alternatives to score with each prompt token (None: the prompt is not scored)."""
        wanted = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        return max(wanted) if wanted else None

    def to_config(self, model: LoadedModel) -> GenerationConfig:
        """The options over ``model``'s generation defaults. ``stop_token_ids`` come on top of the
        end-of-sequence ids, unless those are ignored (``ignore_eos``). Several choices that do not
        sample are one sequence, repeated (``copies``)."""
        options = option_values(self.options)
        options.pop("num_return_sequences", None)
        options["adapter"] = self.adapter
        stop_ids = options.pop("stop_token_ids", [])
        if stop_ids or self.ignore_eos:
            options["stop_token_ids"] = [*(() if self.ignore_eos else model.manifest.tokenizer.eos_token_ids), *stop_ids]
        try:
            config = model.config(**options)
            return config.replace(num_return_sequences=self.n) if config.samples else config
        except ConfigError as e:
            raise self.error(e) from None

    def copies(self, config: GenerationConfig) -> int:
        """How many identical choices each of ``config``'s sequences makes."""
        return self.n // config.num_return_sequences

    def error(self, e: ConfigError) -> APIError:
        """A 400 for an option GenerationConfig refused, naming the request field that set it."""
        return config_error(e, {**DEFAULT_PARAMS, **self.params})


@dataclass(frozen=True)
class CompletionRequest(GenerationRequest):
    """A checked ``/v1/completions`` request."""


@dataclass(frozen=True)
class ChatRequest(GenerationRequest):
    """A checked ``/v1/chat/completions`` request; ``tools``: the functions an answer may call (its
    JSON is then a call), or None."""

    tools: tuple[str, ...] | None = None


def check_fields(body: Any, allowed: set[str], required: tuple[str, ...]) -> None:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise APIError(400, f"unsupported field '{unknown[0]}'", unknown[0], "unsupported_parameter")
    for name in required:
        if body.get(name) is None:
            raise APIError(400, f"'{name}' is required", name, "missing_required_parameter")


def check_model(body: dict, served: str, adapters: tuple[str, ...] = ()) -> str | None:
    """The model named is the one served, or one of its LoRA ``adapters`` (each its own model id):
    returns that adapter's name (None: the base model); and ``user`` (an end user's id, which changes
    nothing) is a string, as OpenAI's requests have it."""
    read_value(body, "user", lambda v: isinstance(v, str), "a string")
    name = read_value(body, "model", lambda v: isinstance(v, str), "a string")
    if name == served:
        return None
    if name in adapters:
        return name
    known = ", ".join(f"'{n}'" for n in (served, *adapters))
    raise APIError(404, f"the model '{name}' does not exist; this server serves {known}", "model", "model_not_found")


def read_inputs(given: Any, param: str, vocab: int, encode: Callable[[list[str]], list[list[int]]]) -> list[list[int]]:
    """Token ids per input, from a string, a list of strings (``encode``), token ids (a list), or a
    list of those."""
    bad = APIError(400, f"'{param}' must be a string, a list of strings, or token ids (a list, or a list of lists)", param)
    if isinstance(given, str):
        given = [given]
    if not isinstance(given, list) or not given:
        raise bad
    if all(isinstance(t, str) for t in given):
        return encode(given)
    if all(is_int(t) for t in given):
        given = [given]
    if not all(isinstance(p, list) and p and all(is_int(t) for t in p) for p in given):
        raise bad
    if not all(is_token_ids(p, vocab) for p in given):
        raise APIError(400, f"'{param}' token ids must be from 0 to {vocab - 1}", param)
    return [list(p) for p in given]


def read_logprobs(body: dict, name: str) -> int | None:
    """How many alternatives to report with each token's log-probability (``body[name]``), or None."""
    top = read_value(body, name, is_int, "an integer")
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise APIError(400, f"'{name}' must be from 0 to {MAX_LOGPROBS}", name)
    return top


def read_generation(
    body: dict, options: GenerationOptions, params: Mapping[str, str], prompts: list[list[int]], ctx_size: int,
    prompt_param: str, max_tokens: int | None,
) -> dict:
    """The fields both generation endpoints share, checked, with the request's ``options`` (and the
    request fields that set them, ``params``): the prompts fit a slot's context with the tokens asked
    for (``max_tokens`` when the request asks for none; None: what the context leaves)."""
    if options.max_new_tokens is None:
        options = dataclasses.replace(options, max_new_tokens=fit(prompts, max_tokens, ctx_size, prompt_param))
    else:
        fit(prompts, options.max_new_tokens, ctx_size, prompt_param)
    for name, (check, what) in PASSIVE_FIELDS.items():
        read_value(body, name, check, what)
    if (options.num_return_sequences or 1) > MAX_CHOICES:
        raise APIError(400, f"'{params['num_return_sequences']}' must be at most {MAX_CHOICES}", params["num_return_sequences"])
    stream = read_value(body, "stream", is_bool, "true or false") or False
    include_usage = False
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not stream:
            raise APIError(400, "'stream_options' is only allowed with 'stream': true", "stream_options")
        if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}:
            raise APIError(400, "'stream_options' may hold 'include_usage' only", "stream_options")
        include_usage = read_value(stream_options, "include_usage", is_bool, "true or false") or False
    ignore_eos = read_value(body, "ignore_eos", is_bool, "true or false") or False
    prompt_logprobs = read_logprobs(body, "prompt_logprobs")
    return dict(prompts=prompts, options=options, params=params, stream=stream, include_usage=include_usage,
                ignore_eos=ignore_eos, prompt_logprobs=prompt_logprobs)  # fmt: skip


def fit(prompts: list[list[int]], max_tokens: int | None, ctx_size: int, param: str) -> int:
    """The tokens to generate, once every prompt is found to fit a slot's ``ctx_size`` positions
    with them (None: all that the longest prompt leaves); the one check of a prompt's length."""
    for ids in prompts:
        if not ids:
            raise APIError(400, "the prompt is empty", param)
        if len(ids) >= ctx_size:
            raise APIError(
                400, f"the prompt has {len(ids)} tokens, more than fit this server's context of {ctx_size} per request",
                param, "context_length_exceeded",
            )  # fmt: skip
    longest = max(len(p) for p in prompts)
    room = ctx_size - longest
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise APIError(
            400,
            f"this model's context per request is {ctx_size} tokens, but the prompt has {longest} and "
            f"max_tokens asks for {max_tokens} more",
            "max_tokens", "context_length_exceeded",
        )  # fmt: skip
    return max_tokens
