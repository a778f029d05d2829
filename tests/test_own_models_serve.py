"""``lmrt serve`` on models of one's own: a real server process on an exported LSTM (a recurrent row
per slot) and on the hand-written GPT without a cache (a window re-run each step), driven by the
official openai client, each answer compared with the Generator's on the same directory. The slots
are fewer than the clients and the prefill chunk is shorter than the prompts, so rows are prefilled
in pieces while others decode."""

from __future__ import annotations

import os

import pytest

openai = pytest.importorskip("openai")

from serving import Server, complete_at_once  # noqa: E402
from test_own_models import WORDS, LstmLM, TinyGPT, one_torch_thread, train  # noqa: E402,F401 (one_torch_thread: autouse)
from lmrt.export import export_model  # noqa: E402
from lmrt.runtime import Generator  # noqa: E402
from lmrt.runtime.state_snapshots import PER_ROW  # noqa: E402
from lmrt.state_size import size  # noqa: E402

PROMPTS = ["the cat", "a bird saw the dog on the", "the dog ran after the cat . the bird"]
CTX = 32  # the GPT's window: every prompt and its answer fit


@pytest.fixture(scope="module", params=["lstm", "gpt"])
def served(request, tmp_path_factory):
    """(kind, Generator, Server) of a word-level model trained here, its vocabulary ending in <eos>."""
    vocab = sorted(set(WORDS.split())) + ["<eos>"]
    module = LstmLM(len(vocab)) if request.param == "lstm" else TinyGPT(len(vocab))
    train(module, [vocab.index(w) for w in WORDS.split()], steps=80 if request.param == "lstm" else 60)
    out = tmp_path_factory.mktemp("serve") / request.param
    export_model(module, str(out), tokenizer=vocab, progress=lambda line: None)
    server = Server(str(out), "--slots", "2", "--ctx-size", str(CTX), "--prefill-chunk", "3")
    yield request.param, Generator(str(out), provider="cpu"), server
    server.stop()


def test_the_start_line_says_what_the_slots_reserve(served):
    kind, gen, server = served
    ready = next(line for line in server.lines if line.startswith("lmrt serve: http://"))
    if kind == "lstm":  # h and c of 64 floats each, the buffer a step writes, the snapshots
        assert f"2 slots x {CTX} tokens, state 2 x {size(2 * 64 * 4 * (2 + PER_ROW))} reserved (each: a row's state" in ready
    else:
        assert f"2 slots x {CTX} tokens, no state: each step runs a slot's tokens again" in ready


def model_name(gen: Generator) -> str:
    return os.path.basename(gen.model_dir)


@pytest.mark.parametrize("stream", [False, True])
def test_completions_equal_the_generator(served, stream):
    _, gen, server = served
    client = server.client()
    for prompt in PROMPTS:
        completion = gen.generate_batch([prompt], max_new_tokens=10)[0][0]
        if stream:
            chunks = list(client.completions.create(model=model_name(gen), prompt=prompt, max_tokens=10, stream=True,
                                                    stream_options={"include_usage": True}))  # fmt: skip
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            usage = chunks[-1].usage
            reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            out = client.completions.create(model=model_name(gen), prompt=prompt, max_tokens=10)
            text, usage, reasons = out.choices[0].text, out.usage, [out.choices[0].finish_reason]
        assert text == gen.generate(prompt, max_new_tokens=10) == completion.text
        assert usage.prompt_tokens == len(gen.encode(prompt)) and usage.completion_tokens == len(completion.token_ids)
        assert reasons == [{"stop": "stop", "length": "length"}[completion.finish_reason]]


def test_clients_at_once_each_get_their_answer_alone(served):
    """Six clients on two slots, prompts longer than the prefill chunk: rows are prefilled in
    pieces beside rows that decode, handed from one request to the next, and each answer is what
    the Generator gives that prompt alone."""
    _, gen, server = served
    client = server.client()
    jobs = []
    for i in range(6):
        settings = dict(max_tokens=6 + i % 3 * 3, extra_body={"ignore_eos": True})
        if i % 2:
            settings.update(temperature=0.9, top_p=0.9, seed=i)
        jobs.append((PROMPTS[i % 3] + " the" * (i // 3), settings, i % 3 == 0))
    results = complete_at_once(client, model_name(gen), jobs)
    for (prompt, settings, _), got in zip(jobs, results):
        options = {k: v for k, v in settings.items() if k not in ("max_tokens", "extra_body")}
        assert got == gen.generate(prompt, max_new_tokens=settings["max_tokens"], stop_token_ids=[], **options), (prompt, settings)


def test_n_samples_of_one_prompt_equal_the_generator(served):
    _, gen, server = served
    out = server.client().completions.create(model=model_name(gen), prompt=PROMPTS[1], n=2, max_tokens=8, temperature=1.2, seed=5)
    expected = gen.generate_batch([PROMPTS[1]], num_return_sequences=2, max_new_tokens=8, temperature=1.2, seed=5)[0]
    assert [c.text for c in out.choices] == [c.text for c in expected]


def test_logprobs_equal_scoring(served):
    _, gen, server = served
    ids = gen.encode(PROMPTS[2])
    out = server.client().completions.create(model=model_name(gen), prompt=ids, max_tokens=8, logprobs=2, temperature=0.8, seed=2)
    generated = gen.generate_batch([ids], max_new_tokens=8, temperature=0.8, seed=2)[0][0].token_ids
    scored = gen.score(ids + generated).logprobs[len(ids) - 1 :]
    assert out.choices[0].logprobs.token_logprobs == pytest.approx(list(scored), abs=2e-4)
    assert out.choices[0].logprobs.tokens == [gen.decode([t]) for t in generated]


def test_a_next_turn_reuses_the_row_that_holds_its_history(served):
    """A prompt that starts with a whole earlier exchange takes the row that holds it, all of it
    (a recurrent row's state is at its end); its answer is the Generator's for the whole history."""
    _, gen, server = served
    client = server.client()
    prompt = "a cat saw a dog and"  # the start of no other test's prompt
    first = client.completions.create(model=model_name(gen), prompt=prompt, max_tokens=5, extra_body={"ignore_eos": True})
    history = f"{prompt} {first.choices[0].text} and the"
    assert gen.encode(history)[: first.usage.total_tokens] == gen.encode(prompt) + gen.encode(first.choices[0].text)
    second = client.completions.create(model=model_name(gen), prompt=history, max_tokens=5, extra_body={"ignore_eos": True})
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.total_tokens - 1  # all the row held
    assert second.choices[0].text == gen.generate(history, max_new_tokens=5, stop_token_ids=[])


def test_a_prompt_sharing_the_start_of_an_earlier_one_reuses_it(served):
    """A prompt that shares only the first half of an earlier one: a window row reuses the shared
    tokens, a recurrent row the snapshot at the last prompt chunk's boundary within them (chunks of
    3); the answer is the Generator's either way, and /metrics counts the reused tokens."""
    kind, gen, server = served
    client = server.client()
    earlier = "a bird saw a dog and a cat ran home to the park"  # the start of no other test's prompt
    client.completions.create(model=model_name(gen), prompt=earlier, max_tokens=3, extra_body={"ignore_eos": True})
    shared = gen.encode(earlier)[:8]
    prompt = gen.decode(shared) + " sat on the mat"
    assert gen.encode(prompt)[:9] != gen.encode(earlier)[:9] and gen.encode(prompt)[:8] == shared
    cached_before = server.metric("lmrt:prompt_tokens_cached_total")
    out = client.completions.create(model=model_name(gen), prompt=prompt, max_tokens=5, extra_body={"ignore_eos": True})
    assert out.usage.prompt_tokens_details.cached_tokens == (8 if kind == "gpt" else 8 // 3 * 3)
    assert server.metric("lmrt:prompt_tokens_cached_total") - cached_before == out.usage.prompt_tokens_details.cached_tokens
    assert out.choices[0].text == gen.generate(prompt, max_new_tokens=5, stop_token_ids=[])


def test_speculation_on_equals_the_answer_without(served):
    _, gen, server = served
    body = {"model": model_name(gen), "prompt": PROMPTS[2] + " . the dog ran after the cat . the", "max_tokens": 12, "speculation": "on"}
    status, answer = server.raw("POST", "/v1/completions", json_body(body))
    assert status == 200 and answer["choices"][0]["text"] == gen.generate(body["prompt"], max_new_tokens=12, speculation="off")


def json_body(body: dict) -> bytes:
    import json

    return json.dumps(body).encode()
