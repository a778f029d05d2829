"""``POST /v1/responses`` on a real ``lmrt serve`` of SmolLM2, driven by the official openai client's
``responses`` (create, stream, parse, retrieve, delete). Every answer is compared with the chat
route's answer to the same conversation, greedy: the Responses API is that route, shaped anew."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")

from serving import Server  # noqa: E402

pytestmark = pytest.mark.real_model
MODEL = "model"
STORED = 3  # the server keeps this many answers
QUESTION = "What is the capital of France?"
WEATHER = {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"], "additionalProperties": False,
}  # fmt: skip
TOOLS = [
    {"type": "function", "name": "get_weather", "description": "Weather in a city.", "parameters": WEATHER, "strict": True},
    {"type": "function", "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}},
                                                        "required": ["a"], "additionalProperties": False}},
]  # fmt: skip
CHAT_TOOLS = [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters") if k in t}} for t in TOOLS]


@pytest.fixture(scope="module")
def server(smollm2):
    server = Server(smollm2[0], "--slots", "2", "--ctx-size", "1024", "--model-name", MODEL, "--stored-responses", str(STORED))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def chat(client, messages, **options):
    """The chat route's greedy answer to ``messages``: (text, tool calls, finish reason, usage)."""
    out = client.chat.completions.create(model=MODEL, messages=messages, **options)
    choice = out.choices[0]
    return choice.message.content, choice.message.tool_calls, choice.finish_reason, out.usage


# --- the answer is the chat route's -------------------------------------------------------------


@pytest.mark.parametrize("form", ["string", "items"])
def test_text_equals_the_chat_completion(client, form):
    if form == "string":
        got = client.responses.create(model=MODEL, input=QUESTION, instructions="Be brief.", max_output_tokens=40)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    else:  # developer is the system role; input_text parts are joined
        items = [{"role": "developer", "content": "Answer in one sentence."},
                 {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "What is the capital "},
                                                                  {"type": "input_text", "text": "of Italy?"}]}]  # fmt: skip
        got = client.responses.create(model=MODEL, input=items, max_output_tokens=40)
        messages = [{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": "What is the capital of Italy?"}]
    text, _, reason, usage = chat(client, messages, max_tokens=40)
    assert reason == "stop" and got.status == "completed" and got.incomplete_details is None
    assert got.output_text == text and text
    assert [o.type for o in got.output] == ["message"] and got.output[0].role == "assistant"
    assert got.output[0].content[0].type == "output_text"
    assert (got.usage.input_tokens, got.usage.output_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    assert got.usage.total_tokens == usage.total_tokens
    assert got.model == MODEL and got.object == "response"


def test_max_output_tokens_cuts_into_incomplete(client):
    got = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=3)
    text, _, reason, _ = chat(client, [{"role": "user", "content": QUESTION}], max_tokens=3)
    assert reason == "length"
    assert got.status == "incomplete" and got.incomplete_details.reason == "max_output_tokens"
    assert got.output_text == text and got.usage.output_tokens == 3 and got.output[0].status == "incomplete"


def test_sampling_options_reach_the_chat_route(client):
    """temperature, top_p and seed: the same sampled answer as the chat route's with them."""
    options = dict(temperature=0.9, top_p=0.8, max_output_tokens=24)
    got = client.responses.create(model=MODEL, input="Tell me a story.", extra_body={"seed": 7}, **options)
    text, *_ = chat(client, [{"role": "user", "content": "Tell me a story."}], temperature=0.9, top_p=0.8, max_tokens=24, seed=7)
    assert got.output_text == text and (got.temperature, got.top_p) == (0.9, 0.8)


# --- streaming ----------------------------------------------------------------------------------

TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
TEXT_DONE = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


@pytest.mark.parametrize("max_tokens", [40, 4])
def test_stream_events_add_up_to_the_answer(client, max_tokens):
    whole = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=max_tokens)
    events = list(client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=max_tokens, stream=True))
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    last = "response.completed" if whole.status == "completed" else "response.incomplete"
    assert kinds == TEXT_EVENTS + ["response.output_text.delta"] * len(deltas) + TEXT_DONE + [last]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(deltas) == whole.output_text and len(deltas) >= 2
    final = events[-1].response
    assert final.status == whole.status and final.output_text == whole.output_text
    assert events[-2].item.content[0].text == whole.output_text == events[-4].text
    assert final.usage.output_tokens == whole.usage.output_tokens and final.usage.input_tokens == whole.usage.input_tokens
    assert {e.item_id for e in events if hasattr(e, "item_id")} == {final.output[0].id}
    assert events[0].response.status == "in_progress" and events[0].response.id == final.id


def test_stream_helper_gives_the_final_response(client):
    whole = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=40)
    with client.responses.stream(model=MODEL, input=QUESTION, max_output_tokens=40) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == whole.output_text
    assert client.responses.retrieve(final.id).output_text == whole.output_text  # a streamed answer is stored


# --- function tools -----------------------------------------------------------------------------


def test_function_tools_round_trip(client):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    got = client.responses.create(model=MODEL, input=ask, tools=TOOLS, tool_choice="required", max_output_tokens=60)
    _, calls, reason, _ = chat(client, ask, tools=CHAT_TOOLS, tool_choice="required", max_tokens=60)
    assert reason == "tool_calls" and got.status == "completed"
    [call] = got.output
    assert call.type == "function_call" and (call.name, call.arguments) == (calls[0].function.name, calls[0].function.arguments)
    schema = next(t["parameters"] for t in TOOLS if t["name"] == call.name)
    jsonschema.validate(json.loads(call.arguments), schema)
    named = client.responses.create(model=MODEL, input=ask, tools=TOOLS, tool_choice={"type": "function", "name": "add"},
                                    max_output_tokens=60)  # fmt: skip
    assert [o.name for o in named.output] == ["add"]
    with client.responses.stream(model=MODEL, input=ask, tools=TOOLS, tool_choice="required", max_output_tokens=60) as stream:
        kinds = [e.type for e in stream]
        streamed = stream.get_final_response()
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]  # fmt: skip
    assert streamed.output[0].arguments == call.arguments and streamed.output[0].parsed_arguments == json.loads(call.arguments)
    # the call and its output go back as input items; the answer is the chat route's to the same turns
    follow = ask + [call.model_dump(exclude_none=True), {"type": "function_call_output", "call_id": call.call_id, "output": "18 C, sunny"}]
    answer = client.responses.create(model=MODEL, input=follow, tools=TOOLS, tool_choice="none", max_output_tokens=30)
    history = ask + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": call.call_id, "type": "function",
                                                               "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "18 C, sunny"},
    ]  # fmt: skip
    text, *_ = chat(client, history, tools=CHAT_TOOLS, tool_choice="none", max_tokens=30)
    assert answer.output_text == text and text


# --- text.format ------------------------------------------------------------------------------


def test_json_schema_output_parses_and_validates(client):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    pydantic = pytest.importorskip("pydantic")

    class City(pydantic.BaseModel):
        name: str
        country: str

    ask = "Name a city in France, as JSON."
    parsed = client.responses.parse(model=MODEL, input=ask, text_format=City, max_output_tokens=60)
    assert isinstance(parsed.output_parsed, City)
    schema = City.model_json_schema()
    jsonschema.validate(json.loads(parsed.output_text), schema)
    fmt = {"type": "json_schema", "name": "city", "schema": schema}
    got = client.responses.create(model=MODEL, input=ask, text={"format": fmt}, max_output_tokens=60)
    text, *_ = chat(client, [{"role": "user", "content": ask}], max_tokens=60,
                    response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})  # fmt: skip
    assert got.output_text == text and got.text.format.type == "json_schema"
    short = 'Reply with this JSON object: {"city": "Paris"}'
    loose = client.responses.create(model=MODEL, input=short, text={"format": {"type": "json_object"}}, max_output_tokens=100)
    text, *_ = chat(client, [{"role": "user", "content": short}], max_tokens=100, response_format={"type": "json_object"})
    assert loose.status == "completed" and loose.output_text == text and isinstance(json.loads(text), dict)


# --- previous_response_id and the store ---------------------------------------------------------


def test_previous_response_id_continues_the_conversation(client):
    first = client.responses.create(model=MODEL, input=QUESTION, instructions="Be brief.", max_output_tokens=30)
    second = client.responses.create(model=MODEL, input="And of Italy?", previous_response_id=first.id, max_output_tokens=30)
    # the earlier turn is in the prompt; its instructions are not carried over (OpenAI's rule)
    history = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first.output_text},
               {"role": "user", "content": "And of Italy?"}]  # fmt: skip
    text, _, _, usage = chat(client, history, max_tokens=30)
    assert second.output_text == text and second.usage.input_tokens == usage.prompt_tokens
    assert second.previous_response_id == first.id
    third = client.responses.create(model=MODEL, input="And of Spain?", previous_response_id=second.id, max_output_tokens=30)
    history += [{"role": "assistant", "content": second.output_text}, {"role": "user", "content": "And of Spain?"}]
    assert third.output_text == chat(client, history, max_tokens=30)[0]


def test_store_keeps_a_bounded_number_and_honours_store_false(client, server):
    made = [client.responses.create(model=MODEL, input=f"Say {i}.", max_output_tokens=2) for i in range(STORED + 1)]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made[0].id)  # the least recently used went
    for kept in made[1:]:
        assert client.responses.retrieve(kept.id).model_dump() == kept.model_dump()
    unstored = client.responses.create(model=MODEL, input="Hi.", max_output_tokens=2, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    status, body = server.raw("POST", "/v1/responses", json.dumps(
        {"model": MODEL, "input": "Hi.", "previous_response_id": unstored.id}).encode())  # fmt: skip
    assert status == 400 and body["error"]["param"] == "previous_response_id"
    client.responses.delete(made[-1].id)
    for call in (client.responses.retrieve, client.responses.delete):
        with pytest.raises(openai.NotFoundError) as e:
            call(made[-1].id)
        assert e.value.body["code"] == "response_not_found"


# --- fields -------------------------------------------------------------------------------------


def test_passive_fields_are_accepted_and_change_nothing(client):
    plain = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=20)
    passive = client.responses.create(
        model=MODEL, input=QUESTION, max_output_tokens=20, metadata={"run": "1"}, user="u", store=True,
        service_tier="auto", truncation="disabled", include=[], parallel_tool_calls=False, safety_identifier="s",
    )  # fmt: skip
    assert passive.output_text == plain.output_text and passive.metadata == {"run": "1"}
    assert passive.parallel_tool_calls is False


def _bad(body: dict) -> dict:
    return {"model": MODEL, "input": "hi", **body}


BAD = [
    ("unknown field", _bad({"conversation": "c"}), "conversation"),
    ("no input", {"model": MODEL}, "input"),
    ("reasoning effort", _bad({"reasoning": {"effort": "high"}}), "reasoning"),
    ("background", _bad({"background": True}), "background"),
    ("built-in tool", _bad({"tools": [{"type": "web_search"}]}), "tools"),
    ("chat-shaped tool", _bad({"tools": [{"type": "function", "function": {"name": "f"}}]}), "tools"),
    ("tool choice shape", _bad({"tools": TOOLS, "tool_choice": {"type": "web_search"}}), "tool_choice"),
    ("image part", _bad({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}), "input"),
    ("unknown role", _bad({"input": [{"role": "wizard", "content": "hi"}]}), "input"),
    ("unknown item", _bad({"input": [{"type": "reasoning", "summary": []}]}), "input"),
    ("empty input", _bad({"input": []}), "input"),
    ("metadata type", _bad({"metadata": {"a": 1}}), "metadata"),
    ("store type", _bad({"store": "yes"}), "store"),
    ("user type", _bad({"user": 5}), "user"),
    ("service tier", _bad({"service_tier": "fastest"}), "service_tier"),
    ("truncation auto", _bad({"truncation": "auto"}), "truncation"),
    ("include", _bad({"include": ["message.output_text.logprobs"]}), "include"),
    ("text format", _bad({"text": {"format": {"type": "xml"}}}), "text.format"),
    ("max output tokens", _bad({"max_output_tokens": 0}), "max_output_tokens"),
    ("past the context", _bad({"max_output_tokens": 5000}), "max_output_tokens"),
    ("temperature", _bad({"temperature": 3}), "temperature"),
    ("unknown previous", _bad({"previous_response_id": "resp-none"}), "previous_response_id"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_requests_are_400s_naming_the_field(server, case):
    _, body, param = case
    status, answer = server.raw("POST", "/v1/responses", json.dumps(body).encode())
    assert status == 400 and answer["error"]["param"] == param, answer
    assert answer["error"]["type"] == "invalid_request_error"


def test_unknown_model_is_a_404(server):
    status, answer = server.raw("POST", "/v1/responses", json.dumps({"model": "other", "input": "hi"}).encode())
    assert status == 404 and answer["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("value", [-1, 1.5])
def test_stored_responses_is_checked(smollm2, value):
    from lmrt.serve.errors import ServeError
    from lmrt.serve.settings import ServeSettings

    with pytest.raises(ServeError, match="--stored-responses must be an integer of at least 0"):
        ServeSettings(model_dir=smollm2[0], stored_responses=value)
