"""``POST /v1/chat/completions``: messages rendered by the model's chat template, OpenAI's tools and
log-probabilities, and the chat completion responses and chunks."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, AsyncIterator

from ..runtime import ChatTemplateError, Event
from ..runtime.config import CONSTRAINT_FIELDS
from . import responses
from .bridge import Run
from .errors import APIError
from .options import is_bool, read_options, read_value
from ..runtime import LoadedModel
from .requests import GENERATION_FIELDS, ChatRequest, check_fields, check_model, read_generation, read_logprobs
from .tools import calls_written, is_call, parse_tools, tool_calls, with_tools_described

CHAT_FIELDS = GENERATION_FIELDS | {"messages", "logprobs", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls"}
# The roles a message may have, and the role a chat template sees ("developer" is OpenAI's newer
# name of "system", which templates know).
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def parse_chat(body: Any, model: LoadedModel, served: str, ctx_size: int) -> ChatRequest:
    check_fields(body, CHAT_FIELDS, ("model", "messages"))
    adapter = check_model(body, served, model.adapter_names)
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    tools = parse_tools(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"))
    parallel = tools is not None and tools.parallel
    rendered = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or ("content" not in m and "tool_calls" not in m):
            raise APIError(400, f"messages[{i}] needs a 'role' and a 'content'", "messages")
        if m["role"] not in ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}; got '{m['role'][:40]}'", "messages")
        rendered.append({**m, "role": ROLES[m["role"]], "content": _message_text(m, i, parallel)})
    options, params = read_options(body, model.manifest.architecture.vocab_size)
    if tools is not None:
        rendered = with_tools_described(rendered, tools.functions, parallel)
    if tools is not None and tools.constraint:
        given = [params[name] for name in CONSTRAINT_FIELDS if getattr(options, name) is not None]
        if given:
            raise APIError(400, f"'{given[0]}' cannot be combined with 'tools' unless 'tool_choice' is \"none\"", given[0])
        options = dataclasses.replace(options, **tools.constraint)
        params = {**params, **{name: "tools" for name in tools.constraint}}
    logprobs = None
    if read_value(body, "logprobs", is_bool, "true or false"):
        logprobs = read_logprobs(body, "top_logprobs") or 0
    elif body.get("top_logprobs") is not None:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    try:
        prompt = model.chat_prompt(rendered)
    except ChatTemplateError as e:
        raise APIError(400, str(e), "messages") from None
    fields = {**read_generation(body, options, params, [prompt], ctx_size, "messages", None), "adapter": adapter}
    if fields["stream"] and fields["prompt_logprobs"] is not None:
        raise APIError(400, "'prompt_logprobs' are not streamed on chat: ask for the answer whole", "prompt_logprobs")
    if tools is None or not tools.constraint:
        return ChatRequest(**fields, logprobs=logprobs)
    if fields["stream"] and logprobs is not None:
        raise APIError(400, "'logprobs' are not streamed with 'tools': the answer comes whole", "logprobs")
    return ChatRequest(**fields, logprobs=logprobs, tools=tuple(tools.functions))


def _message_text(m: dict, i: int, parallel: bool) -> str:
    """What a message says: its text, or for an assistant's earlier tool calls, those calls as the
    JSON the model writes for them (a list of several with ``parallel``)."""
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
            written.append({"name": c["function"].get("name"), "arguments": arguments})
        return calls_written(written, parallel)
    return _text_content(m.get("content"), i)


def _text_content(content: Any, i: int) -> str:
    """A message's content: a string, or a list of text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        raise APIError(400, f"messages[{i}]: only text content parts are supported", "messages")
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")


class ChatAnswer:
    """Chat completion responses and chunks."""

    @staticmethod
    async def whole(run: Run, model: LoadedModel, model_name: str) -> dict:
        got = await responses.collect(run)
        choices = []
        for i in range(run.choices):
            message, reason = _chat_message(run, got.texts[i], got.reasons[i])
            logprobs = responses.chat_logprobs(model, got.logprobs[i]) if run.request.logprobs is not None else None
            choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": reason})
        head = responses.head(model_name, "chatcmpl", "chat.completion")
        answer = {**head, "choices": choices, "usage": responses.usage(run, sum(got.tokens))}
        if run.request.prompt_logprobs is not None:  # vLLM's, beside the choices
            score = (await run.scores())[0]
            answer["prompt_logprobs"] = responses.vllm_prompt_logprobs(model, score, run.request.prompt_logprobs)
        return answer

    @staticmethod
    async def stream(run: Run, model: LoadedModel, model_name: str) -> AsyncIterator[dict]:
        head, extra = responses.head(model_name, "chatcmpl", "chat.completion.chunk"), responses.usage_field(run)
        for i in range(run.choices):
            delta = {"role": "assistant", "content": ""}
            yield {**head, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}], **extra}
        if run.request.tools:  # whether the answer is a call is known once it is complete: it comes whole
            got = await responses.collect(run)
            for i in range(run.choices):
                message, reason = _chat_message(run, got.texts[i], got.reasons[i])
                delta = {k: v for k, v in message.items() if k != "role"}
                if "tool_calls" in delta:
                    delta["tool_calls"] = [{"index": j, **c} for j, c in enumerate(delta["tool_calls"])]
                yield {**head, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}], **extra}
            if run.request.include_usage:
                yield {**head, "choices": [], "usage": responses.usage(run, sum(got.tokens))}
            return

        def choice(i: int, event: Event) -> dict:
            logprobs = responses.chat_logprobs(model, [event.logprob]) if event.logprob is not None else None
            return {"index": i, "delta": {"content": event.text} if event.text else {}, "logprobs": logprobs}

        async for chunk in responses.chunks(run, head, choice):
            yield chunk


def _chat_message(run: Run, text: str, reason: str | None) -> tuple[dict, str | None]:
    """A chat answer's message and finish reason: with tools, an answer that is a call comes as
    OpenAI's tool_calls (finish reason "tool_calls"); one cut by the token budget (finish reason
    "length") keeps the calls it completed, and never its JSON as content."""
    tools = run.request.tools
    if not tools or not is_call(text) or reason not in ("stop", "length"):
        return {"role": "assistant", "content": text}, responses.finish_reason(reason)
    calls = tool_calls(text, tools)
    if not calls and reason == "stop":  # not a call after all
        return {"role": "assistant", "content": text}, "stop"
    message = {"role": "assistant", "content": None, **({"tool_calls": calls} if calls else {})}
    return message, "tool_calls" if reason == "stop" else "length"
