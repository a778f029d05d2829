"""OpenAI's function calling: a request's ``tools`` and ``tool_choice`` as a constraint on the answer,
the functions described to the model, and an answer that is a call as OpenAI's ``tool_calls``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import APIError
from .responses import new_id


@dataclass(frozen=True)
class Tools:
    """A request's functions (name -> parameter schema) and the constraint its tool_choice asks for."""

    functions: dict[str, dict]
    constraint: dict  # GenerationConfig field -> value; empty: the model answers freely ("none")


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

