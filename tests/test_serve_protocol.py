"""``lmrt serve`` speaks the protocol clients expect: echo with prompt log-probabilities (what
lm-eval's loglikelihood sends), vLLM's ``prompt_logprobs``, parallel tool calls, greedy ``n``, the
passive standard fields, ``/v1/models/{id}`` and vLLM's tokenizer routes. A real server on
SmolLM2-135M-Instruct; every answer is compared with the Generator's own."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

openai = pytest.importorskip("openai")

from serving import TOOLS, Server  # noqa: E402
from lmrt import runtime  # noqa: E402
from lmrt.runtime.sampling import log_softmax  # noqa: E402

pytestmark = pytest.mark.real_model

MODEL = "model"  # the served name: the model directory's
CTX = 1024
PROMPTS = ["The capital of France is", "Question: what do bees make?\nAnswer:"]


def _call(i: int, name: str, arguments: dict) -> dict:
    return {"id": f"call-{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


# An earlier turn in which the assistant called both functions at once: the model follows it.
TWO_CALLS = [
    {"role": "user", "content": "What is the weather in Rome, and what is 2 + 3?"},
    {"role": "assistant", "content": None, "tool_calls": [_call(1, "get_weather", {"city": "Rome", "unit": "C"}),
                                                          _call(2, "add", {"a": 2, "b": 3})]},
    {"role": "tool", "tool_call_id": "call-1", "content": "20 C"},
    {"role": "tool", "tool_call_id": "call-2", "content": "5"},
    {"role": "assistant", "content": "It is 20 C in Rome, and 2 + 3 is 5."},
    {"role": "user", "content": "What is the weather in Paris, and what is 4 + 7?"},
]  # fmt: skip


@pytest.fixture(scope="module")
def server(smollm2):
    server = Server(smollm2[0], "--slots", "2", "--ctx-size", str(CTX))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gen(smollm2):
    return runtime.Generator(smollm2[0], provider="cpu")


def _ranks_and_top(gen, ids: list[int], k: int):
    """Each prompt token's rank and the k likeliest tokens at each position, from one pass."""
    logp = log_softmax(gen.model.sequence_logits(ids)[:-1])
    chosen = logp[np.arange(len(ids) - 1), ids[1:]]
    ranks = (logp > chosen[:, None]).sum(-1) + 1
    top = [list(np.argsort(-row, kind="stable")[:k]) for row in logp]
    return ranks, top


# --- echo and prompt log-probabilities ------------------------------------------------------------


def test_echo_logprobs_equal_generator_score(server, gen):
    """lm-eval's loglikelihood request: a batch of prompts (token ids), echo, logprobs 1, one greedy
    token. Each prompt token's logprob equals Generator.score, the first is null, the generated token
    follows, and what lm-eval reads of it (the sum, whether greedy) comes out the same."""
    ids = [gen.encode(p) for p in PROMPTS]
    out = server.client().completions.create(model=MODEL, prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0, seed=1234)
    assert [c.index for c in out.choices] == [0, 1]
    for prompt, p_ids, choice in zip(PROMPTS, ids, out.choices):
        generated = gen.generate_batch([p_ids], max_new_tokens=1)[0][0]
        lp = choice.logprobs
        n = len(p_ids)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n + 1
        assert lp.tokens == [gen.decode([t]) for t in p_ids + generated.token_ids]
        score = gen.score(p_ids)
        np.testing.assert_allclose(lp.token_logprobs[1:n], score.logprobs, atol=2e-4)
        assert choice.text == gen.decode(p_ids) + generated.text
        assert lp.text_offset == list(np.cumsum([0] + [len(t) for t in lp.tokens[:-1]]))
        # one alternative per token, the likeliest: what lm-eval's is_greedy compares against
        ranks, top = _ranks_and_top(gen, p_ids, 1)
        for i in range(1, n):
            (text, value), = lp.top_logprobs[i].items()
            assert text == gen.decode([int(top[i - 1][0])])
            assert value >= lp.token_logprobs[i] - 1e-9
            assert (ranks[i - 1] == 1) == (abs(value - lp.token_logprobs[i]) < 1e-9)
        assert choice.finish_reason in ("length", "stop")


def test_echo_of_text_prompts_and_top_logprobs(server, gen):
    out = server.client().completions.create(model=MODEL, prompt=PROMPTS, echo=True, logprobs=3, max_tokens=4, temperature=0)
    for prompt, choice in zip(PROMPTS, out.choices):
        ids = gen.encode(prompt)
        assert choice.text == prompt + gen.generate(prompt, max_new_tokens=4)
        tops = choice.logprobs.top_logprobs
        assert tops[0] is None and all(1 <= len(t) <= 3 for t in tops[1:]) and any(len(t) == 3 for t in tops[1:])
        _, top = _ranks_and_top(gen, ids, 3)
        for i in range(1, len(ids)):
            assert set(tops[i]) == {gen.decode([int(t)]) for t in top[i - 1]}


def test_max_tokens_zero_with_echo_only_scores(server, gen):
    client = server.client()
    ids = gen.encode(PROMPTS[1])
    out = client.completions.create(model=MODEL, prompt=PROMPTS[1], echo=True, logprobs=0, max_tokens=0)
    choice = out.choices[0]
    assert choice.finish_reason == "length" and choice.text == PROMPTS[1]
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(ids)
    np.testing.assert_allclose(choice.logprobs.token_logprobs[1:], gen.score(ids).logprobs, atol=2e-4)
    assert len(choice.logprobs.tokens) == len(ids)
    single = client.completions.create(model=MODEL, prompt=ids[:1], echo=True, logprobs=1, max_tokens=0).choices[0]
    assert single.logprobs.token_logprobs == [None] and single.text == gen.decode(ids[:1])
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=0)
    assert e.value.body["param"] == "max_tokens"


def test_streamed_echo_starts_with_the_prompt(server, gen):
    chunks = list(server.client().completions.create(model=MODEL, prompt=PROMPTS[0], echo=True, logprobs=1, max_tokens=6,
                                                     stream=True, stream_options={"include_usage": True}))  # fmt: skip
    first = chunks[0].choices[0]
    ids = gen.encode(PROMPTS[0])
    assert first.text == PROMPTS[0] and first.logprobs.token_logprobs[0] is None
    np.testing.assert_allclose(first.logprobs.token_logprobs[1:], gen.score(ids).logprobs, atol=2e-4)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == PROMPTS[0] + gen.generate(PROMPTS[0], max_new_tokens=6)
    assert chunks[-1].usage.completion_tokens == len(gen.generate_batch([ids], max_new_tokens=6)[0][0].token_ids)
    # scoring only, streamed: the prompt, then the finish
    chunks = list(server.client().completions.create(model=MODEL, prompt=PROMPTS[0], echo=True, max_tokens=0, stream=True))
    assert [c.choices[0].text for c in chunks] == [PROMPTS[0], ""]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_vllm_prompt_logprobs(server, gen):
    """vLLM's prompt_logprobs: None first, then by token id the prompt token's logprob and rank
    and the k likeliest tokens' (ranks 1..k), per completion choice and beside chat's choices."""
    client = server.client()

    def check(entries, ids, k):
        assert entries[0] is None and len(entries) == len(ids)
        ranks, top = _ranks_and_top(gen, ids, k)
        score = gen.score(ids)
        for i, entry in enumerate(entries[1:]):
            mine = entry[str(ids[i + 1])]
            assert abs(mine["logprob"] - score.logprobs[i]) < 2e-4 and mine["rank"] == ranks[i]
            assert mine["decoded_token"] == gen.decode([ids[i + 1]])
            assert {int(t) for t in entry} == {ids[i + 1], *(int(t) for t in top[i])}
            assert [entry[str(t)]["rank"] for t in top[i]] == list(range(1, k + 1))

    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=2, extra_body={"prompt_logprobs": 2})
    check(out.choices[0].model_extra["prompt_logprobs"], gen.encode(PROMPTS[0]), 2)
    messages = [{"role": "user", "content": "Name a colour."}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, extra_body={"prompt_logprobs": 1})
    check(chat.model_extra["prompt_logprobs"], gen.chat_prompt(messages), 1)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body={"prompt_logprobs": 99})
    assert e.value.body["param"] == "prompt_logprobs"


# --- tools, n, passive fields ---------------------------------------------------------------------


def _checked_calls(message) -> list[tuple[str, dict]]:
    jsonschema = pytest.importorskip("jsonschema")
    spec = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    calls = []
    for call in message.tool_calls or []:
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, spec[call.function.name])
        calls.append((call.function.name, arguments))
    return calls


@pytest.mark.parametrize("tool_choice", ["required", "auto"])
def test_parallel_tool_calls(server, tool_choice):
    """true (the default with tools): an answer may be several calls, each its own tool_calls entry;
    false: at most one. The history's earlier turn of two calls is shown to the model as a list."""
    pytest.importorskip("llguidance")
    client = server.client()
    ask = dict(model=MODEL, messages=TWO_CALLS, tools=TOOLS, tool_choice=tool_choice, max_tokens=80, temperature=0)
    several = client.chat.completions.create(**ask).choices[0]
    assert several.finish_reason == "tool_calls" and several.message.content is None
    calls = _checked_calls(several.message)
    assert [name for name, _ in calls] == ["get_weather", "add"]
    explicit = client.chat.completions.create(**ask, parallel_tool_calls=True).choices[0]
    assert _checked_calls(explicit.message) == calls
    one = client.chat.completions.create(**ask, parallel_tool_calls=False).choices[0]
    assert one.finish_reason == "tool_calls" and len(_checked_calls(one.message)) == 1
    ids = {c.id for c in several.message.tool_calls}
    assert len(ids) == 2


def test_a_tool_call_cut_by_the_budget_is_length_with_the_calls_it_completed(server):
    pytest.importorskip("llguidance")
    client = server.client()
    ask = dict(model=MODEL, messages=TWO_CALLS, tools=TOOLS, tool_choice="required", temperature=0)
    whole = client.chat.completions.create(**ask, max_tokens=80)
    budget = whole.usage.completion_tokens
    cut = client.chat.completions.create(**ask, max_tokens=budget - 3).choices[0]  # inside the second call
    assert cut.finish_reason == "length" and cut.message.content is None
    assert _checked_calls(cut.message) == _checked_calls(whole.choices[0].message)[:1]
    early = client.chat.completions.create(**ask, max_tokens=4).choices[0]  # inside the first call
    assert early.finish_reason == "length" and early.message.content is None and not early.message.tool_calls
    streamed = [c for c in client.chat.completions.create(**ask, max_tokens=4, stream=True) if c.choices]
    assert streamed[-1].choices[0].finish_reason == "length"
    assert all(not (c.choices[0].delta.content or "").lstrip().startswith("{") for c in streamed)


def test_n_at_temperature_zero_gives_identical_greedy_choices(server, gen):
    client = server.client()
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], n=2, max_tokens=8, temperature=0)
    expected = gen.generate(PROMPTS[0], max_new_tokens=8)
    assert [c.index for c in out.choices] == [0, 1] and [c.text for c in out.choices] == [expected, expected]
    messages = [{"role": "user", "content": "Say hello."}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, n=3, max_tokens=8, temperature=0)
    assert [c.message.content for c in chat.choices] == [gen.chat(messages, max_new_tokens=8)] * 3
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], n=2, max_tokens=8, temperature=0, stream=True))
    texts = ["".join(c.choices[0].text for c in streamed if c.choices[0].index == i) for i in range(2)]
    assert texts == [expected, expected]


def test_passive_fields_are_accepted_and_change_nothing(server, gen):
    client = server.client()
    messages = [{"role": "user", "content": "Say hello."}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, store=True, metadata={"run": "a"},
                                         user="someone", service_tier="auto")  # fmt: skip
    assert out.choices[0].message.content == gen.chat(messages, max_new_tokens=8)
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, user="someone", extra_body={"store": False})
    assert out.choices[0].text == gen.generate(PROMPTS[0], max_new_tokens=8)


PASSIVE_BAD = [
    ("store", "yes"), ("metadata", {"a": 1}), ("metadata", {f"k{i}": "v" for i in range(17)}), ("metadata", ["a"]),
    ("user", 5), ("service_tier", 3), ("parallel_tool_calls", "yes"), ("echo", "yes"),
]  # fmt: skip


@pytest.mark.parametrize("field,value", PASSIVE_BAD, ids=[f"{f}={v!r}"[:40] for f, v in PASSIVE_BAD])
def test_wrong_types_are_400s_naming_the_field(server, field, value):
    route, body = ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2})
    if field == "parallel_tool_calls":
        route, body = "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}
    status, answer = server.raw("POST", route, json.dumps({**body, field: value}).encode())
    assert status == 400 and answer["error"]["param"] == field, answer


@pytest.mark.parametrize("field,value", [("suffix", "x"), ("prediction", {"type": "content", "content": "x"})])
def test_fields_that_would_change_the_answer_stay_refused(server, field, value):
    status, answer = server.raw("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", field: value}).encode())
    assert status == 400 and answer["error"]["param"] == field


def test_parallel_tool_calls_needs_tools(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "parallel_tool_calls": False}
    status, answer = server.raw("POST", "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400 and answer["error"]["param"] == "parallel_tool_calls"


# --- routes: models/{id}, tokenize, detokenize, tokenizer_info ------------------------------------


def test_models_retrieve(server):
    client = server.client()
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model" and card.model_extra["max_model_len"] == CTX
    assert client.models.list().data[0].id == card.id
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-9")
    assert e.value.body["code"] == "model_not_found"


def test_tokenize_and_detokenize_equal_the_models_tokenizer(server, gen):
    text = "Hello world: 北京 🚀"
    status, out = server.raw("POST", "/tokenize", json.dumps({"prompt": text, "return_token_strs": True}).encode())
    assert status == 200
    assert out["tokens"] == gen.encode(text) and out["count"] == len(out["tokens"]) and out["max_model_len"] == CTX
    assert out["token_strs"] == [gen.model.tokenizer.id_to_token(t) for t in out["tokens"]]
    status, plain = server.raw("POST", "/tokenize", json.dumps({"prompt": text, "add_special_tokens": False}).encode())
    assert plain["tokens"] == gen.encode(text, add_special_tokens=False) and "token_strs" not in plain
    status, back = server.raw("POST", "/detokenize", json.dumps({"tokens": out["tokens"]}).encode())
    assert status == 200 and back["prompt"] == gen.model.tokenizer.decode(out["tokens"], skip_special_tokens=False)
    assert back["prompt"].endswith(text)
    messages = [{"role": "user", "content": "Hi there"}]
    for generation in (True, False):
        body = {"messages": messages, "add_generation_prompt": generation, "model": MODEL}
        status, chat = server.raw("POST", "/tokenize", json.dumps(body).encode())
        assert status == 200 and chat["tokens"] == gen.model.chat_prompt(messages, add_generation_prompt=generation)
    for bad in ({"prompt": "a", "messages": messages}, {"prompt": 5}, {"prompt": "a", "model": "gpt-9"}, {"prompt": "a", "x": 1}):
        status, answer = server.raw("POST", "/tokenize", json.dumps(bad).encode())
        assert status in (400, 404) and answer["error"]["message"], bad
    status, answer = server.raw("POST", "/detokenize", json.dumps({"tokens": [gen.model.vocab_size]}).encode())
    assert status == 400 and answer["error"]["param"] == "tokens"


def test_tokenizer_info_is_what_lm_evals_remote_tokenizer_reads(server, gen):
    status, info = server.raw("GET", "/tokenizer_info")
    tok = gen.model.manifest.tokenizer
    assert status == 200
    assert info["eos_token"] == tok.eos_token and info["bos_token"] == tok.bos_token
    assert info["chat_template"] == tok.chat_template and info["model_max_length"] == CTX
    # lm-eval finds the end-of-sequence id by tokenizing the token's text without special tokens
    status, eos = server.raw("POST", "/tokenize", json.dumps({"prompt": info["eos_token"], "add_special_tokens": False}).encode())
    assert eos["tokens"][0] in tok.eos_token_ids


def test_new_routes_need_the_api_key(tiny_models, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    path = tiny_models["gpt2"][2]
    server = Server(path, "--api-key-file", str(key_file), "--slots", "1")
    try:
        name = os.path.basename(path)
        for method, route, body in [("GET", f"/v1/models/{name}", None), ("GET", "/tokenizer_info", None),
                                    ("POST", "/tokenize", b'{"prompt": "hi"}'), ("POST", "/detokenize", b'{"tokens": [1]}')]:  # fmt: skip
            status, answer = server.raw(method, route, body)
            assert status == 401 and answer["error"]["code"] == "invalid_api_key", route
            status, answer = server.raw(method, route, body, {"Authorization": "Bearer s3cret"})
            assert status == 200, (route, answer)
    finally:
        server.stop()
