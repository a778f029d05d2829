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
    parallel: bool = False  # whether an answer may be several calls


def parse_tools(tools: Any, choice: Any, parallel: Any = None) -> Tools | None:
    """OpenAI's ``tools``, ``tool_choice`` and ``parallel_tool_calls``. "required" or a named
    function: the answer is a call, JSON ``{"name": ..., "arguments": {...}}`` matching a function's
    parameters, or with ``parallel_tool_calls`` (the default) a JSON list of such calls; "auto" (the
    default): a call (or a list), or text that does not start with "{" (or "["); "none": free text."""
    if tools is None:
        for name, given in (("tool_choice", choice), ("parallel_tool_calls", parallel)):
            if given is not None:
                raise APIError(400, f"'{name}' needs 'tools'", name)
        return None
    if parallel is not None and not isinstance(parallel, bool):
        raise APIError(400, "'parallel_tool_calls' must be true or false", "parallel_tool_calls")
    parallel = parallel is not False
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
        return Tools(functions, {"json_schema": _answer_schema({name: functions[name]}, parallel)}, parallel)
    if choice == "none":
        return Tools(functions, {}, parallel)
    if choice == "required":
        return Tools(functions, {"json_schema": _answer_schema(functions, parallel)}, parallel)
    if choice == "auto":
        schema = json.dumps(_answer_schema(functions, parallel))
        first = "{\\[" if parallel else "{"
        return Tools(functions, {"grammar": f"start: call | text\ncall: %json {schema}\ntext: /[^{first}\\s][\\s\\S]*/"}, parallel)
    raise APIError(400, "'tool_choice' must be \"none\", \"auto\", \"required\" or a function", "tool_choice")


def _answer_schema(functions: dict[str, dict], parallel: bool) -> dict:
    """The JSON an answer that calls is: one call, or with ``parallel`` a list of calls too."""
    call = _call_schema(functions)
    return {"anyOf": [call, {"type": "array", "items": call, "minItems": 1}]} if parallel else call


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


def with_tools_described(messages: list[dict], functions: dict[str, dict], parallel: bool = False) -> list[dict]:
    """``messages`` with the functions described in the system message (added when there is none),
    since a chat template may have no place for them."""
    listed = "\n".join(
        json.dumps({"name": n, "description": f["description"], "parameters": f["parameters"]}, ensure_ascii=False)
        for n, f in functions.items()
    )
    text = (
        "You can call these functions:\n" + listed + "\nTo call one, answer with only a JSON object "
        '{"name": <function name>, "arguments": <its arguments>}'
        + ("; to call several, with only a JSON list of such objects." if parallel else ".")
    )
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def calls_written(calls: list[dict], parallel: bool) -> str:
    """Earlier calls (``{"name": ..., "arguments": ...}``) as the model writes them: one JSON object,
    or with ``parallel`` a JSON list when there are several."""
    if parallel and len(calls) > 1:
        return json.dumps(calls, ensure_ascii=False)
    return "\n".join(json.dumps(c, ensure_ascii=False) for c in calls)


def is_call(text: str) -> bool:
    """Whether an answer under the tools constraint is (the start of) a call rather than text."""
    return text.lstrip()[:1] in ("{", "[")


def tool_calls(text: str, tools: tuple[str, ...]) -> list[dict]:
    """OpenAI's tool_calls for the calls of ``tools`` that ``text`` (one call, or a list of calls)
    completes; a list cut short gives the calls before the cut, a cut single call none."""
    text = text.strip()
    decoder, found = json.JSONDecoder(), []
    at = 1 if text.startswith("[") else 0
    while True:
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        if at >= len(text) or text[at] == "]":
            break
        try:
            call, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            break
        found.append(call)
    return [
        {"id": new_id("call"), "type": "function",
         "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
        for c in found
        if isinstance(c, dict) and c.get("name") in tools and isinstance(c.get("arguments"), dict)
    ]  # fmt: skip

