"""``lmrt serve``: a real server process on 127.0.0.1, driven by the official openai client and by
raw HTTP for what that client will not send. Every answer is compared with the Generator's own."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

openai = pytest.importorskip("openai")

from serving import TOOLS, Server, complete_at_once, wait_for  # noqa: E402
from lmrt import runtime  # noqa: E402

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tiny_server(tiny_models):
    server = Server(tiny_models["llama"][2], "--slots", "4", "--ctx-size", "128", "--prefill-chunk", "16")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def llama(tiny_models):
    return runtime.Generator(tiny_models["llama"][2], provider="cpu")


MODEL = "llama-onnx"


# --- answers equal the Generator's --------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_completions_equal_the_generator(tiny_server, llama, stream):
    client = tiny_server.client()
    expected = llama.generate("The capital of", max_new_tokens=20)
    ids = llama.encode("The capital of")
    if stream:
        chunks = list(client.completions.create(model=MODEL, prompt="The capital of", max_tokens=20, stream=True,
                                                stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        usage = chunks[-1].usage
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        out = client.completions.create(model=MODEL, prompt="The capital of", max_tokens=20)
        text, usage, reasons = out.choices[0].text, out.usage, [out.choices[0].finish_reason]
    assert text == expected
    completion = llama.generate_batch([ids], max_new_tokens=20)[0][0]
    assert usage.prompt_tokens == len(ids) and usage.completion_tokens == len(completion.token_ids)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert reasons == [{"stop": "stop", "length": "length"}[completion.finish_reason]]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_the_generator(chat_model, stream):
    """The chat route renders the model's template (the tiny chat model has one)."""
    path = chat_model
    gen = runtime.Generator(path)
    server = Server(path, "--slots", "2")
    try:
        client = server.client()
        expected = gen.chat(CHAT, max_new_tokens=16)
        if stream:
            chunks = list(client.chat.completions.create(model=os.path.basename(path), messages=CHAT, max_tokens=16, stream=True))
            assert chunks[0].choices[0].delta.role == "assistant"
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
        else:
            out = client.chat.completions.create(model=os.path.basename(path), messages=CHAT, max_completion_tokens=16)
            text = out.choices[0].message.content
            assert out.choices[0].message.role == "assistant"
            assert out.usage.prompt_tokens == len(gen.chat_prompt(CHAT))
        assert text == expected
    finally:
        server.stop()


def test_n_seed_and_stop_strings(tiny_server, llama):
    client = tiny_server.client()
    options = dict(max_new_tokens=24, temperature=0.9, top_p=0.95, seed=3)
    expected = llama.generate_batch(["Once upon a time"], num_return_sequences=2, **options)[0]
    out = client.completions.create(model=MODEL, prompt="Once upon a time", n=2, max_tokens=24, temperature=0.9, top_p=0.95, seed=3)
    assert [c.text for c in out.choices] == [c.text for c in expected]
    again = client.completions.create(model=MODEL, prompt="Once upon a time", n=2, max_tokens=24, temperature=0.9, top_p=0.95, seed=3)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]
    assert out.choices[0].text != out.choices[1].text
    stop = expected[0].text[8:11]
    assert stop.strip()
    cut = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0.9, top_p=0.95, seed=3, stop=[stop])
    assert cut.choices[0].text == llama.generate("Once upon a time", stop=[stop], **options)
    # the stop string occurs in the uncut text: the answer ends just before its first occurrence
    at = expected[0].text.index(stop)
    assert at <= 8 and cut.choices[0].text == expected[0].text[:at]
    assert cut.choices[0].finish_reason == "stop"


def test_several_prompts_in_one_completion_request(tiny_server, llama):
    prompts = ["The capital of", "Small models", "北京"]
    out = tiny_server.client().completions.create(model=MODEL, prompt=prompts, max_tokens=10)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [llama.generate(p, max_new_tokens=10) for p in prompts]


def test_logprobs_equal_scoring(tiny_server, llama):
    ids = llama.encode("The capital of")
    out = tiny_server.client().completions.create(model=MODEL, prompt=ids, max_tokens=12, logprobs=2, temperature=0.7, seed=1)
    lp = out.choices[0].logprobs
    generated = llama.generate_batch([ids], max_new_tokens=12, temperature=0.7, seed=1)[0][0].token_ids
    scored = llama.score(ids + generated).logprobs[len(ids) - 1 :]
    np.testing.assert_allclose(lp.token_logprobs, scored, atol=2e-4)
    assert lp.tokens == [llama.decode([t]) for t in generated]
    assert len(lp.top_logprobs) == len(generated)
    # two alternatives per token, keyed by their text (two tokens with one text make one entry)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs) and any(len(top) == 2 for top in lp.top_logprobs)


def test_chat_logprobs(chat_model):
    path = chat_model
    gen = runtime.Generator(path)
    server = Server(path, "--slots", "1")
    try:
        out = server.client().chat.completions.create(
            model=os.path.basename(path), messages=CHAT, max_tokens=8, logprobs=True, top_logprobs=3
        )
        prompt = gen.chat_prompt(CHAT)
        generated = gen.generate_batch([prompt], max_new_tokens=8)[0][0].token_ids
        scored = gen.score(prompt + generated).logprobs[len(prompt) - 1 :]
        content = out.choices[0].logprobs.content
        np.testing.assert_allclose([c.logprob for c in content], scored, atol=2e-4)
        assert all(len(c.top_logprobs) == 3 for c in content)
        assert all(c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)  # greedy: the chosen one is top
    finally:
        server.stop()


# --- many clients, prefix reuse, cancellation --------------------------------------------------


def test_sixteen_clients_at_once_each_get_their_answer_alone(tiny_server, llama):
    client = tiny_server.client()
    words = "the capital of France is Paris and the capital of Italy is Rome".split()
    jobs = []
    for i in range(16):
        prompt = " ".join(words[: 2 + (i * 5) % len(words)]) * (1 + i % 3)
        settings = dict(max_tokens=8 + i % 5 * 4)
        if i % 4 == 1:
            settings.update(temperature=0.8, seed=i)
        if i % 4 == 2:
            settings.update(presence_penalty=0.6, frequency_penalty=0.3)
        if i % 4 == 3:
            settings.update(extra_body={"ignore_eos": True, "top_k": 5, "temperature": 0.5, "seed": 7})
        jobs.append((prompt, settings, i % 2 == 0))
    results = complete_at_once(client, MODEL, jobs)
    for (prompt, settings, _), got in zip(jobs, results):
        options = {("max_new_tokens" if k == "max_tokens" else k): v for k, v in settings.items() if k != "extra_body"}
        if "extra_body" in settings:
            options.update(stop_token_ids=[], top_k=5, temperature=0.5, seed=7)
        assert got == llama.generate(prompt, **options), (prompt, settings)


def test_second_turn_reuses_the_first_turns_cache(chat_model):
    path = chat_model
    gen = runtime.Generator(path)
    server = Server(path, "--slots", "2")
    try:
        client = server.client()
        name = os.path.basename(path)
        first = client.chat.completions.create(model=name, messages=CHAT, max_tokens=12)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        history = CHAT + [{"role": "assistant", "content": first.choices[0].message.content},
                          {"role": "user", "content": "And of Italy?"}]  # fmt: skip
        second = client.chat.completions.create(model=name, messages=history, max_tokens=12)
        assert second.usage.prompt_tokens_details.cached_tokens > len(gen.chat_prompt(CHAT))
        assert second.choices[0].message.content == gen.chat(history, max_new_tokens=12)
    finally:
        server.stop()


def test_a_client_that_leaves_frees_its_slot_and_the_others_go_on(tiny_server, llama):
    """A stream dropped after its first chunk gives its slot back at once, and a concurrent stream's
    text is what it is alone."""
    client = tiny_server.client()
    base = tiny_server.metric("lmrt:requests_finished_total")
    predicted = tiny_server.metric("llamacpp:tokens_predicted_total")
    other: list[str] = []
    other_thread = threading.Thread(
        target=lambda: other.append("".join(
            c.choices[0].text for c in client.completions.create(model=MODEL, prompt="Small models", max_tokens=60, stream=True) if c.choices
        ))
    )  # fmt: skip
    other_thread.start()
    conn = http.client.HTTPConnection(tiny_server.host, int(tiny_server.port), timeout=30)
    body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 120, "stream": True, "ignore_eos": True})
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # the first chunk came
    conn.close()  # and the client leaves
    other_thread.join(60)
    wait_for(lambda: tiny_server.metric("lmrt:kv_slots_in_use") == 0 and tiny_server.metric("lmrt:requests_finished_total") >= base + 2,
             "the dropped stream's slot to be given back and both requests to finish")  # fmt: skip
    assert tiny_server.metric("lmrt:kv_slots_in_use") == 0
    assert tiny_server.metric("lmrt:requests_finished_total") == base + 2
    assert other == [llama.generate("Small models", max_new_tokens=60)]
    # the dropped stream stopped early: fewer than its 120 tokens were generated
    other_tokens = len(llama.generate_batch(["Small models"], max_new_tokens=60)[0][0].token_ids)
    assert tiny_server.metric("llamacpp:tokens_predicted_total") - predicted < other_tokens + 120
    status, _ = tiny_server.raw("GET", "/health")
    assert status == 200


# --- bad requests ------------------------------------------------------------------------------

BAD = [
    ("malformed JSON", "/v1/completions", b'{"model": "x", "prompt": ', 400, "invalid_json"),
    ("not an object", "/v1/completions", b"[1, 2]", 400, None),
    ("wrong type", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "ten"}, 400, None),
    ("wrong type (bool)", "/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": True}, 400, None),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404, "model_not_found"),
    ("missing messages", "/v1/chat/completions", {"model": MODEL}, 400, "missing_required_parameter"),
    ("empty messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400, None),
    ("message without role", "/v1/chat/completions", {"model": MODEL, "messages": [{"content": "hi"}]}, 400, None),
    ("no chat template", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, 400, None),
    ("n too large", "/v1/completions", {"model": MODEL, "prompt": "hi", "n": 50, "temperature": 1}, 400, None),
    ("n not an integer", "/v1/completions", {"model": MODEL, "prompt": "hi", "n": "two"}, 400, None),
    ("max_tokens beyond the context", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 500}, 400, "context_length_exceeded"),
    ("max_tokens zero", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, None),
    ("prompt beyond the slot", "/v1/completions", {"model": MODEL, "prompt": "word " * 300}, 400, "context_length_exceeded"),
    ("empty prompt", "/v1/completions", {"model": MODEL, "prompt": ""}, 400, None),
    ("token id beyond the vocabulary", "/v1/completions", {"model": MODEL, "prompt": [1, 99999]}, 400, None),
    ("unknown field", "/v1/completions", {"model": MODEL, "prompt": "hi", "best_of_n": 2}, 400, "unsupported_parameter"),
    ("beam search", "/v1/completions", {"model": MODEL, "prompt": "hi", "num_beams": 2}, 400, "unsupported_parameter"),
    ("bad speculation", "/v1/completions", {"model": MODEL, "prompt": "hi", "speculation": "maybe"}, 400, None),
    ("bad guided_choice", "/v1/completions", {"model": MODEL, "prompt": "hi", "guided_choice": []}, 400, None),
    ("empty tools", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": []}, 400, None),
    ("temperature out of range", "/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 3}, 400, None),
    ("top_p out of range", "/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, None),
    ("bad stop", "/v1/completions", {"model": MODEL, "prompt": "hi", "stop": [""]}, 400, None),
    ("bad logit_bias", "/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"abc": 1}}, 400, None),
    ("stream_options without stream", "/v1/completions", {"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}}, 400, None),
    ("echo not a bool", "/v1/completions", {"model": MODEL, "prompt": "hi", "echo": "yes"}, 400, None),
    ("image content", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, None),
    ("huge body", "/v1/completions", b'{"model": "x", "prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}', 413, "request_too_large"),
    ("no route", "/v1/embeddings-nope", {"model": MODEL}, 404, None),
]


@pytest.mark.parametrize("name,path,body,status,code", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_the_right_4xx_and_the_server_keeps_serving(tiny_server, name, path, body, status, code):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, answer = tiny_server.raw("POST", path, data)
    assert got == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
    if code:
        assert answer["error"]["code"] == code
    assert tiny_server.raw("GET", "/health") == (200, {"status": "ok"})


def test_the_openai_client_sees_errors_as_its_own_exceptions(tiny_server):
    client = tiny_server.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=1000)


def test_api_key(tiny_models, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    server = Server(tiny_models["gpt2"][2], "--api-key-file", str(key_file), "--slots", "1")
    try:
        name = os.path.basename(tiny_models["gpt2"][2])
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").completions.create(model=name, prompt="hi", max_tokens=2)
        status, body = server.raw("GET", "/v1/models")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert server.raw("GET", "/metrics")[0] == 401
        assert server.raw("GET", "/health") == (200, {"status": "ok"})  # health needs no key
        out = server.client(api_key="s3cret").completions.create(model=name, prompt="hi", max_tokens=2)
        assert out.usage.completion_tokens == 2
        assert server.client(api_key="s3cret").models.list().data[0].id == name
    finally:
        server.stop()


def test_metrics_use_llama_servers_names(tiny_server):
    status, text = tiny_server.raw("GET", "/metrics")
    assert status == 200
    for name in ("llamacpp:prompt_tokens_total", "llamacpp:tokens_predicted_total", "llamacpp:requests_processing",
                 "llamacpp:requests_deferred", "llamacpp:predicted_tokens_seconds", "lmrt:kv_slots_in_use"):
        assert re.search(rf"^# TYPE {re.escape(name)} (counter|gauge)$", text, re.M), name
    before = tiny_server.metric("llamacpp:tokens_predicted_total")
    tiny_server.client().completions.create(model=MODEL, prompt="hi", max_tokens=5, stop=None)
    assert tiny_server.metric("llamacpp:tokens_predicted_total") >= before + 1


def test_startup_errors_are_one_line(tiny_models):
    path = tiny_models["gpt2"][2]
    for args, message in [
        (["/no/such/model"], "model directory not found"),
        ([path, "--ctx-size", "100000"], "--ctx-size must be from 2"),
        ([path, "--slots", "0"], "--slots must be at least 1"),
        ([path, "--api-key", "a", "--api-key-file", "b"], "contradict"),
    ]:
        proc = subprocess.run([sys.executable, "-m", "lmrt", "serve", *args, "--port", "0"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip().startswith("error:") and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# --- structured output -----------------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def chat_server(chat_model):
    server = Server(chat_model, "--slots", "4")
    yield server
    server.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_equals_the_generator(chat_server, chat_model, stream):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    gen = runtime.Generator(chat_model)
    client = chat_server.client()
    model = os.path.basename(chat_model)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(4):
        options = dict(temperature=1.0, seed=seed, max_tokens=70)
        expected = gen.chat(CHAT, json_schema=PERSON, temperature=1.0, seed=seed, max_new_tokens=70)
        if stream:
            chunks = list(client.chat.completions.create(model=model, messages=CHAT, response_format=fmt, stream=True, **options))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reason = chunks[-1].choices[0].finish_reason
        else:
            out = client.chat.completions.create(model=model, messages=CHAT, response_format=fmt, **options)
            text, reason = out.choices[0].message.content, out.choices[0].finish_reason
        assert text == expected and reason == "stop"
        jsonschema.validate(json.loads(text), PERSON)
    # json_object: a seed whose answer the Generator completes within max_tokens, so it must be JSON
    prompt = gen.chat_prompt(CHAT)
    complete = [seed for seed in range(12) if gen.generate_batch(
        [prompt], json_schema={"type": "object"}, temperature=1.0, seed=seed, max_new_tokens=70)[0][0].finish_reason == "stop"]  # fmt: skip
    assert complete, "no seed from 0 to 11 gives a JSON object within 70 tokens"
    out = client.chat.completions.create(
        model=model, messages=CHAT, response_format={"type": "json_object"}, max_tokens=70, seed=complete[0], temperature=1.0
    )
    assert out.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_generation_options_under_vllms_names_equal_the_generator(tiny_server, llama):
    """GenerationConfig's options the OpenAI API lacks are request fields too: the constraints under
    vLLM's names, and speculation."""
    pytest.importorskip("llguidance")
    client = tiny_server.client()
    cases = [
        ({"guided_choice": ["Paris", "Rome"]}, {"choices": ["Paris", "Rome"]}),
        ({"guided_regex": "[a-z]{3,6}"}, {"regex": "[a-z]{3,6}"}),
        ({"guided_json": PERSON}, {"json_schema": PERSON}),
        ({"speculation": "off", "temperature": 0.8, "seed": 2}, {"speculation": "off", "temperature": 0.8, "seed": 2}),
    ]
    for extra, options in cases:
        out = client.completions.create(model=MODEL, prompt="The capital of", max_tokens=40, extra_body=extra)
        assert out.choices[0].text == llama.generate("The capital of", max_new_tokens=40, **options), extra
    texts = [client.completions.create(model=MODEL, prompt=p, max_tokens=8, extra_body=cases[0][0]).choices[0].text
             for p in ("The capital of", "Small models")]  # fmt: skip
    assert all(t in ("Paris", "Rome") for t in texts)
    assert re.fullmatch("[a-z]{3,6}", client.completions.create(model=MODEL, prompt="hi", max_tokens=8, extra_body=cases[1][0]).choices[0].text)


def _check_call(call, jsonschema) -> str:
    spec = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    assert call.type == "function" and call.id.startswith("call-") and call.function.name in spec
    jsonschema.validate(json.loads(call.function.arguments), spec[call.function.name])
    return call.function.name


@pytest.fixture(scope="module")
def smol_server(smollm2):
    server = Server(smollm2[0], "--slots", "2", "--ctx-size", "1024")
    yield server
    server.stop()


@pytest.mark.real_model
def test_tools_give_openai_tool_calls(smol_server):
    """"required" and a named function always give a call whose arguments match the function's
    parameters; "auto" gives a call or text; the call goes back in the history for a next turn.
    (The functions are described in the prompt: a real model's context has room for them.)"""
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    client = smol_server.client()
    model = "model"
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]

    def ask(tool_choice, seed, msgs=messages, stream=False):
        options = dict(model=model, messages=msgs, tools=TOOLS, tool_choice=tool_choice, temperature=0.7, seed=seed, max_tokens=60)
        if not stream:
            choice = client.chat.completions.create(**options).choices[0]
            return choice.message.content, choice.message.tool_calls, choice.finish_reason
        chunks = [c for c in client.chat.completions.create(stream=True, **options) if c.choices]
        content = "".join(c.choices[0].delta.content or "" for c in chunks) or None
        calls = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
        return content, calls or None, chunks[-1].choices[0].finish_reason

    names = set()
    for seed in range(2):
        content, calls, reason = ask("required", seed)
        assert reason == "tool_calls" and content is None and len(calls) == 1
        names.add(_check_call(calls[0], jsonschema))
        content, calls, reason = ask({"type": "function", "function": {"name": "add"}}, seed)
        assert reason == "tool_calls" and _check_call(calls[0], jsonschema) == "add"
        content, calls, reason = ask("auto", seed)
        if calls:
            assert reason == "tool_calls" and content is None
            _check_call(calls[0], jsonschema)
        else:
            assert reason in ("stop", "length") and content and not content.lstrip().startswith("{")
    assert "get_weather" in names  # asked for the weather, the model calls that function
    content, calls, reason = ask("required", 0, stream=True)  # streamed: the call comes in one chunk
    assert reason == "tool_calls" and content is None and len(calls) == 1 and calls[0].index == 0
    _check_call(calls[0], jsonschema)
    content, calls, reason = ask("required", 0)
    follow = messages + [
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() if hasattr(c, "model_dump") else c for c in calls]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "18 C, sunny"},
    ]
    content, _, reason = ask("none", 0, follow)
    assert reason in ("stop", "length") and isinstance(content, str)
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": 3}}}}}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=messages, tools=bad, tool_choice="required", max_tokens=4)
    assert e.value.body["param"] == "tools"


def test_bad_structured_requests_are_400s(chat_server, chat_model):
    pytest.importorskip("llguidance")
    model = os.path.basename(chat_model)
    base = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
    ]  # fmt: skip
    for extra, param in cases:
        status, answer = chat_server.raw("POST", "/v1/chat/completions", json.dumps({**base, **extra}).encode())
        assert status == 400 and answer["error"]["param"] == param, (extra, answer)
    assert chat_server.raw("GET", "/health") == (200, {"status": "ok"})


# --- the real model ---------------------------------------------------------------------------


@pytest.mark.real_model
def test_smollm2_server_loads_answers_and_refuses_when_full(smollm2):
    """/health is 503 while the model loads; chat answers equal the Generator's, streamed or not;
    with one slot and no queue, a second request while the first runs gets 503."""
    path = smollm2[0]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmrt", "serve", path, "--port", "0", "--slots", "1", "--max-queue", "0"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        first = proc.stderr.readline()
        url = re.search(r"listening on (http://\S+);", first).group(1)
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            pytest.fail(f"/health answered {r.status} while loading")
    except urllib.error.HTTPError as e:
        assert e.code == 503 and json.loads(e.read()) == {"status": "loading model"}
    try:
        ready = proc.stderr.readline()
        assert ready.startswith("lmrt serve: http://") and "1 slots x 2048 tokens" in ready
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        gen = runtime.Generator(path)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        expected = gen.chat(messages, max_new_tokens=24)
        assert client.chat.completions.create(model="model", messages=messages, max_tokens=24).choices[0].message.content == expected
        long_stream = client.chat.completions.create(model="model", messages=messages, max_tokens=200, stream=True)
        pieces = [next(iter(long_stream)).choices[0].delta.content]  # it holds the only slot now
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="model", messages=messages, max_tokens=4)
        assert refused.value.status_code == 503 and "busy" in str(refused.value)
        pieces += [c.choices[0].delta.content or "" for c in long_stream]
        assert "".join(pieces) == gen.chat(messages, max_new_tokens=200)
    finally:
        proc.terminate()
        proc.wait(15)


# --- embeddings --------------------------------------------------------------------------------


def test_embeddings_equal_the_encoder(tmp_path_factory):
    """An encoder directory is served on /v1/embeddings: floats and base64 equal Encoder.embed, token
    ids are taken as they are, and the generation routes say what this server is for."""
    import base64

    from test_encoders import make_sentence_transformer

    from lmrt.export import export_model

    root = tmp_path_factory.mktemp("served-encoder")
    exported = str(root / "embedder")
    export_model(make_sentence_transformer("bert", root, "mean", True), exported, progress=lambda _: None)
    encoder = runtime.Encoder(exported)
    texts = ["A cat sits on the mat.", "Ein Hund spielt im Garten.", "x", "the capital of France is Paris " * 3]
    server = Server(exported)
    try:
        client = server.client()
        # the last text is longer than the model takes: refused unless truncate_prompt_tokens asks to cut it
        with pytest.raises(openai.BadRequestError, match="input 3 has"):
            client.embeddings.create(model="embedder", input=texts)
        out = client.embeddings.create(model="embedder", input=texts, extra_body={"truncate_prompt_tokens": -1})
        got = np.array([d.embedding for d in sorted(out.data, key=lambda d: d.index)], dtype=np.float32)
        kept = encoder.tokenize_keeping_last(texts, encoder.max_length)  # vLLM's cut: the last tokens kept
        np.testing.assert_allclose(got[:3], encoder.embed(texts[:3]), atol=1e-6)
        np.testing.assert_allclose(got, encoder.run_ids(kept), atol=1e-6)
        assert out.usage.prompt_tokens == sum(len(t) for t in kept)
        packed = client.embeddings.create(model="embedder", input=texts[:2], encoding_format="base64")
        raw = server.raw("POST", "/v1/embeddings", json.dumps({"model": "embedder", "input": texts[:2], "encoding_format": "base64"}).encode())[1]
        decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]])
        np.testing.assert_allclose(decoded, encoder.embed(texts[:2]), atol=1e-6)
        assert len(packed.data) == 2
        ids = encoder.tokenize(texts[:1])[0]
        by_ids = client.embeddings.create(model="embedder", input=[ids])
        np.testing.assert_allclose(by_ids.data[0].embedding, encoder.embed(texts[:1])[0], atol=1e-6)
        for body, status in [({"model": "embedder", "input": []}, 400), ({"model": "embedder", "input": "hi", "dimensions": 3}, 400),
                             ({"model": "embedder", "input": [[1, 10**9]]}, 400), ({"model": "other", "input": "hi"}, 404),
                             ({"model": "embedder", "input": "hi", "encoding_format": "int8"}, 400)]:  # fmt: skip
            got_status, answer = server.raw("POST", "/v1/embeddings", json.dumps(body).encode())
            assert got_status == status and answer["error"]["message"], body
        status, answer = server.raw("POST", "/v1/completions", json.dumps({"model": "embedder", "prompt": "hi"}).encode())
        assert status == 400 and "/v1/embeddings" in answer["error"]["message"]
    finally:
        server.stop()


def test_a_generation_server_gives_no_embeddings(tiny_server):
    status, answer = tiny_server.raw("POST", "/v1/embeddings", json.dumps({"model": MODEL, "input": "hi"}).encode())
    assert status == 400 and answer["error"]["code"] == "model_not_embedding"


def test_the_mailbox_hands_a_burst_of_events_over_in_order_waking_the_loop_once():
    """Events posted from the engine's thread while the loop is busy arrive together, in order, for
    each request's queue, through one wake-up of the loop; a later event wakes it again."""
    from lmrt.serve.bridge import Mailbox

    loop = asyncio.new_event_loop()
    wakeups = []
    call_soon_threadsafe = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda *args: (wakeups.append(args), call_soon_threadsafe(*args))[1]
    box, first, second = Mailbox(loop), asyncio.Queue(), asyncio.Queue()
    burst = [(first, 0, "a"), (second, 1, "b"), (first, 0, "c"), (second, 1, "d")]
    poster = threading.Thread(target=lambda: [box.post(*item) for item in burst])
    poster.start()
    poster.join()
    loop.run_until_complete(asyncio.sleep(0))
    assert len(wakeups) == 1
    assert [first.get_nowait() for _ in range(2)] == [(0, "a"), (0, "c")]
    assert [second.get_nowait() for _ in range(2)] == [(1, "b"), (1, "d")]
    box.post(first, 0, "e")
    loop.run_until_complete(asyncio.sleep(0))
    assert len(wakeups) == 2 and first.get_nowait() == (0, "e") and first.empty()
    loop.close()
