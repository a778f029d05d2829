"""A ``POST /v1/responses`` body read into the chat route's body: input items become chat messages,
``instructions`` a system message, flat function tools the chat route's tools, ``text.format`` its
response_format, and a ``previous_response_id`` the stored conversation before them.

Every field of the Responses API is known here: those that change nothing in the answer are
type-checked and accepted, those that would change it and are not offered are refused with a 400
naming them. What the chat route checks itself (temperature, top_p, seed, the tools' schemas, the
context's room) it checks there, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import APIError
from .options import is_bool, read_value
from .requests import check_fields
from .response_store import ResponseStore

RESPONSES_FIELDS = {
    "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "seed", "stream", "stream_options",
    "tools", "tool_choice", "parallel_tool_calls", "text", "previous_response_id", "store", "metadata", "user",
    "service_tier", "truncation", "include", "background", "reasoning", "safety_identifier", "prompt_cache_key",
}  # fmt: skip
SERVICE_TIERS = ("auto", "default", "flex", "scale", "priority")
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


@dataclass(frozen=True)
class ResponsesAsk:
    """A checked Responses body: the chat route's body for it, the conversation before the new
    input (the stored one of ``previous_response_id``), and the new input as chat messages."""

    body: dict
    chat: dict
    earlier: tuple[dict, ...]
    new: tuple[dict, ...]

    @property
    def stored(self) -> bool:
        return self.body.get("store") is not False


def read_responses(body: Any, store: ResponseStore) -> ResponsesAsk:
    check_fields(body, RESPONSES_FIELDS, ("model", "input"))
    _check_passive(body)
    earlier: tuple[dict, ...] = ()
    previous = read_value(body, "previous_response_id", lambda v: isinstance(v, str), "a string")
    if previous is not None:
        stored = store.get(previous)
        if stored is None:
            raise APIError(400, f"previous response with id '{previous}' not found", "previous_response_id",
                           "previous_response_not_found")  # fmt: skip
        earlier = stored.conversation
    new = tuple(input_messages(body["input"]))
    instructions = read_value(body, "instructions", lambda v: isinstance(v, str), "a string")
    system = [{"role": "system", "content": instructions}] if instructions else []
    chat = {"model": body["model"], "messages": [*system, *earlier, *new]}
    for name in ("temperature", "top_p", "seed", "stream"):
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    if body.get("stream"):
        chat["stream_options"] = {"include_usage": True}
    if body.get("tools") is not None:
        chat["tools"] = [_chat_tool(t, i) for i, t in enumerate(_list(body, "tools"))]
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _chat_tool_choice(body["tool_choice"])
    if body.get("tools") is not None and body.get("parallel_tool_calls") is not None:
        chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    fmt = _text_format(body)
    if fmt is not None:
        chat["response_format"] = fmt
    return ResponsesAsk(body, chat, earlier, new)


def in_responses_terms(e: APIError) -> APIError:
    """An error of the chat route, naming the Responses fields the client sent."""
    names = {"messages": "input", "max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
             "response_format": "text.format"}  # fmt: skip
    message = e.message
    for chat_name, name in names.items():
        message = message.replace(f"'{chat_name}", f"'{name}").replace(f"{chat_name} asks", f"{name} asks")
    return APIError(e.status, message, names.get(e.param, e.param), e.code, e.kind)


def _check_passive(body: dict) -> None:
    """The fields that change nothing in the answer: their types; and the values of those that
    would change it (``background``, ``reasoning``, ``truncation``, ``include``) that are not offered."""
    for name in ("user", "safety_identifier", "prompt_cache_key"):
        read_value(body, name, lambda v: isinstance(v, str), "a string")
    read_value(body, "store", is_bool, "true or false")
    read_value(body, "parallel_tool_calls", is_bool, "true or false")
    metadata = read_value(body, "metadata", lambda v: isinstance(v, dict), "an object of strings")
    if metadata is not None and not all(isinstance(v, str) for v in metadata.values()):
        raise APIError(400, "'metadata' must be an object of strings", "metadata")
    read_value(body, "service_tier", lambda v: v in SERVICE_TIERS, "one of " + ", ".join(SERVICE_TIERS))
    if read_value(body, "background", is_bool, "true or false"):
        raise APIError(400, "'background': true is not supported: responses are answered at once", "background")
    if read_value(body, "truncation", lambda v: v in ("auto", "disabled"), "\"auto\" or \"disabled\"") == "auto":
        raise APIError(400, "'truncation': \"auto\" is not supported: an input longer than the context is refused",
                       "truncation")  # fmt: skip
    include = read_value(body, "include", lambda v: isinstance(v, list), "a list")
    if include:
        raise APIError(400, f"'include' of {include[0]!r} is not supported", "include")
    reasoning = read_value(body, "reasoning", lambda v: isinstance(v, dict), "an object")
    if reasoning and any(v is not None for v in reasoning.values()):
        raise APIError(400, "'reasoning' is not supported: this model has no reasoning settings", "reasoning")
    options = read_value(body, "stream_options", lambda v: isinstance(v, dict), "an object")
    if options is not None:
        if not body.get("stream"):
            raise APIError(400, "'stream_options' is only allowed with 'stream': true", "stream_options")
        if set(options) - {"include_obfuscation"}:
            raise APIError(400, "'stream_options' may hold 'include_obfuscation' only", "stream_options")
        read_value(options, "include_obfuscation", is_bool, "true or false")


def _list(body: dict, name: str) -> list:
    return read_value(body, name, lambda v: isinstance(v, list), "a list")


def input_messages(given: Any) -> list[dict]:
    """Responses input, a string or a list of items, as chat messages: a message of any role with
    text content; a ``function_call`` (calls in a row make one assistant message) and its
    ``function_call_output`` (a tool message)."""
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    if not isinstance(given, list) or not given:
        raise APIError(400, "'input' must be a string or a non-empty list of input items", "input")
    messages: list[dict] = []
    for i, item in enumerate(given):
        if not isinstance(item, dict):
            raise APIError(400, f"input[{i}] must be an object", "input")
        kind = item.get("type", "message")
        if kind == "message":
            role = ROLES.get(item.get("role"))
            if role is None:
                raise APIError(400, f"input[{i}].role must be one of {', '.join(ROLES)}", "input")
            messages.append({"role": role, "content": _text(item.get("content"), i)})
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", i), "type": "function",
                    "function": {"name": _string(item, "name", i), "arguments": _string(item, "arguments", i)}}  # fmt: skip
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            content = output if isinstance(output, str) else _text(output, i)
            messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", i), "content": content})
        else:
            raise APIError(400, f"input[{i}]: items of type {kind!r} are not supported", "input")
    return messages


def _string(item: dict, name: str, i: int) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise APIError(400, f"input[{i}].{name} must be a string", "input")
    return value


def _text(content: Any, i: int) -> str:
    """A message's content: a string, or its input_text / output_text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if all(p.get("type") in ("input_text", "output_text") and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
    raise APIError(400, f"input[{i}].content must be a string or a list of input_text parts", "input")


def _chat_tool(tool: Any, i: int) -> dict:
    """A Responses function tool ({"type": "function", "name", "parameters", ...}) in the chat
    route's shape; the built-in tools are refused."""
    if not isinstance(tool, dict):
        raise APIError(400, f"tools[{i}] must be an object", "tools")
    if tool.get("type") != "function":
        raise APIError(400, f"tools[{i}]: tools of type {tool.get('type')!r} are not supported, only functions", "tools")
    unknown = sorted(set(tool) - {"type", "name", "description", "parameters", "strict"})
    if unknown:
        raise APIError(400, f"tools[{i}]: unsupported field '{unknown[0]}'", "tools")
    read_value(tool, "strict", is_bool, "true or false")  # the answer always matches the parameters
    function = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function" and set(choice) == {"type", "name"}:
        return {"type": "function", "function": {"name": choice["name"]}}
    if isinstance(choice, str):
        return choice
    raise APIError(400, "'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"name\": ...}",
                   "tool_choice")  # fmt: skip


def _text_format(body: dict) -> dict | None:
    """``text.format`` as the chat route's response_format."""
    text = read_value(body, "text", lambda v: isinstance(v, dict), "an object")
    if text is None:
        return None
    if set(text) - {"format", "verbosity"}:
        raise APIError(400, f"'text' may hold 'format' only, not '{sorted(set(text) - {'format', 'verbosity'})[0]}'", "text")
    if text.get("verbosity") is not None:
        raise APIError(400, "'text.verbosity' is not supported", "text.verbosity")
    fmt = text.get("format")
    if fmt is None or fmt == {"type": "text"}:
        return None
    if isinstance(fmt, dict) and fmt.get("type") == "json_object" and set(fmt) == {"type"}:
        return {"type": "json_object"}
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("name"), str):
        if not set(fmt) <= {"type", "name", "schema", "description", "strict"} or not is_bool(fmt.get("strict", True)):
            raise APIError(400, "'text.format' of type json_schema holds name, schema, description and strict", "text.format")
        spec = {k: fmt[k] for k in ("name", "schema") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    raise APIError(
        400, "'text.format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
        "{\"type\": \"json_schema\", \"name\": ..., \"schema\": {...}}", "text.format",
    )  # fmt: skip
