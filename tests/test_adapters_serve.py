"""LoRA adapters while serving: a real ``lmrt serve`` with adapters and the base model under
concurrent clients, adapters loaded and unloaded while requests run (POST /v1/load_lora_adapter and
/v1/unload_lora_adapter), every refusal of those routes; and speculation with an adapter."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import random_peft
from serving import Server, wait_for
import test_adapters
from test_adapters import TEXT_A, TEXT_B, quiet, save_untrained
from test_serve_faults import assert_error, no_tracebacks

from lmrt import runtime
from lmrt.export import add_adapter

peft = pytest.importorskip("peft")
llama = test_adapters.llama  # the tiny Llama with adapters a and b: the fixture of test_adapters, here too
LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"


def dir_copy(src: str, dst: str) -> str:
    """A copy of the model directory ``src`` (whole files: a weight file with a second hard link is
    refused by onnx's loader, also later, in the original's other tests)."""
    shutil.copytree(src, dst)
    return dst


def post(server: Server, path: str, body: dict, key: str | None = None) -> tuple[int, dict | str]:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    return server.raw("POST", path, json.dumps(body).encode(), headers)


def served_ids(server: Server) -> set[str]:
    return {m.id for m in server.client().models.list().data}


def alone(gen: runtime.Generator, prompt: str, model: str | None, n: int) -> str:
    return gen.generate(prompt, adapter=model, max_new_tokens=n, temperature=0.0)


def test_eight_clients_on_two_adapters_and_the_base_each_get_what_they_get_alone(llama):
    gen = runtime.Generator(llama["adapted"])
    base = os.path.basename(llama["adapted"])
    asks = [("a", TEXT_A[:22], False), ("b", TEXT_B[:16], True), (base, TEXT_A[:22], False), ("b", TEXT_A[:30], False),
            ("a", TEXT_B[:20], True), (base, TEXT_B[:16], True), ("a", TEXT_A[:12], False), ("b", TEXT_B[:28], True)]  # fmt: skip
    server = Server(llama["adapted"], "--slots", "3", "--ctx-size", "96")
    try:
        client = server.client()

        def complete(ask):
            model, prompt, stream = ask
            if not stream:
                out = client.completions.create(model=model, prompt=prompt, max_tokens=14, temperature=0)
                return out.model, out.choices[0].text
            chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=14, temperature=0, stream=True))
            return chunks[0].model, "".join(c.choices[0].text for c in chunks if c.choices)

        with ThreadPoolExecutor(len(asks)) as pool:
            answers = list(pool.map(complete, asks))
        for (model, prompt, _), (named, text) in zip(asks, answers):
            assert named == model
            assert text == alone(gen, prompt, None if model == base else model, 14), (model, prompt)
        assert len({text for _, text in answers}) > 3  # the adapters change the answers
        no_tracebacks(server)
    finally:
        server.stop()


def test_an_adapter_loaded_while_a_client_streams_answers_as_if_it_were_added(llama, tmp_path):
    """The served directory holds "b" (rank 2, three modules); "a" (rank 4, every projection) is
    loaded from its PEFT directory while a client streams with "b": the stacks grow to rank 4 and
    more projections, and each answer equals the Generator's on a directory with both added."""
    served = dir_copy(llama["base"], str(tmp_path / "served"))
    add_adapter(served, llama["peft"]["b"], "b", **quiet)
    gen = runtime.Generator(llama["adapted"])  # a copy of the directory with a and b added
    server = Server(served, "--slots", "2", "--ctx-size", "96", "--allow-adapter-loading")
    try:
        client = server.client()
        assert served_ids(server) == {"served", "b"}
        stream = client.completions.create(model="b", prompt=TEXT_B[:16], max_tokens=60, temperature=0, stream=True)
        first = next(iter(stream))  # the stream is open while the adapter loads
        status, answer = post(server, LOAD, {"lora_name": "a", "lora_path": llama["peft"]["a"]})
        assert (status, answer) == (200, "Success: LoRA adapter 'a' added successfully.")
        streamed = first.choices[0].text + "".join(c.choices[0].text for c in stream if c.choices)
        assert streamed == alone(gen, TEXT_B[:16], "b", 60)
        cards = {m.id: m for m in client.models.list().data}
        assert set(cards) == {"served", "a", "b"} and cards["a"].parent == "served"
        for model, prompt in [("a", TEXT_A[:22]), ("b", TEXT_B[:16]), ("served", TEXT_A[:22])]:
            text = client.completions.create(model=model, prompt=prompt, max_tokens=14, temperature=0).choices[0].text
            assert text == alone(gen, prompt, None if model == "served" else model, 14), model
        assert alone(gen, TEXT_A[:22], "a", 14) != alone(gen, TEXT_A[:22], None, 14)
        # unloaded, then loaded again by name: "b" is the directory's, "a" was in memory only
        assert post(server, UNLOAD, {"lora_name": "a"}) == (200, "Success: LoRA adapter 'a' removed successfully.")
        assert post(server, UNLOAD, {"lora_name": "b"})[0] == 200 and served_ids(server) == {"served"}
        status, answer = post(server, "/v1/completions", {"model": "b", "prompt": "x", "max_tokens": 2})
        assert_error(status, answer, 404, "model_not_found", "'b' does not exist")
        assert_error(*post(server, LOAD, {"lora_name": "a"}), 404, "adapter_not_found", "no adapter 'a'")
        assert post(server, LOAD, {"lora_name": "b"}) == (200, "Success: LoRA adapter 'b' added successfully.")
        text = client.completions.create(model="b", prompt=TEXT_A[:30], max_tokens=14, temperature=0).choices[0].text
        assert text == alone(gen, TEXT_A[:30], "b", 14)
        no_tracebacks(server)
    finally:
        server.stop()
    assert runtime.LoadedModel(served).adapter_names == ("b",)  # nothing loaded was written


def test_every_refusal_of_the_adapter_routes_is_one_json_line(llama, tmp_path):
    closed = Server(llama["adapted"], "--api-key", "k")
    try:
        assert_error(*post(closed, LOAD, {"lora_name": "c", "lora_path": llama["peft"]["a"]}), 401, "invalid_api_key")
        for path, body in [(LOAD, {"lora_name": "c", "lora_path": llama["peft"]["a"]}), (UNLOAD, {"lora_name": "a"})]:
            assert_error(*post(closed, path, body, "k"), 403, "adapter_loading_disabled", "--allow-adapter-loading")
        assert served_ids_with_key(closed) == {"llama-adapted", "a", "b"}
    finally:
        closed.stop()
    plain = Server(llama["base"], "--allow-adapter-loading")
    try:
        status, answer = post(plain, LOAD, {"lora_name": "a", "lora_path": llama["peft"]["a"]})
        assert_error(status, answer, 400, "adapters_unsupported", "add one once with `lmrt adapter MODEL_DIR PEFT_DIR --name NAME`")
    finally:
        plain.stop()
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(LlamaConfig(vocab_size=llama["model"].config.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))  # fmt: skip
    small = save_untrained(small, str(tmp_path / "small"), peft.LoraConfig(target_modules=["q_proj"]))
    dora = save_untrained(llama["model"], str(tmp_path / "dora"), peft.LoraConfig(target_modules=["q_proj"], use_dora=True))
    server = Server(llama["adapted"], "--allow-adapter-loading", "--max-adapters", "3")
    try:
        refusals = [
            (LOAD, {"lora_name": "a", "lora_path": llama["peft"]["a"]}, 400, "adapter_already_loaded", "'a' is already loaded"),
            (LOAD, {"lora_name": "c", "lora_path": str(tmp_path / "missing")}, 400, "invalid_adapter", "not found"),
            (LOAD, {"lora_name": "c", "lora_path": dora}, 400, "invalid_adapter", "DoRA"),
            (LOAD, {"lora_name": "c", "lora_path": small}, 400, "invalid_adapter", "another base model"),
            (LOAD, {"lora_name": "../c", "lora_path": llama["peft"]["a"]}, 400, None, "'lora_name' must be"),
            (LOAD, {"lora_name": "c", "lora_path": 3}, 400, None, "'lora_path' must be"),
            (LOAD, {"lora_path": llama["peft"]["a"]}, 400, "missing_required_parameter", "'lora_name'"),
            (LOAD, {"lora_name": "c", "load_inplace": True}, 400, "unsupported_parameter", "load_inplace"),
            (UNLOAD, {"lora_name": "c"}, 404, "adapter_not_found", "'c' is not loaded"),
            (UNLOAD, {"lora_name": "a", "lora_path": "x"}, 400, "unsupported_parameter", "lora_path"),
        ]
        for path, body, status, code, mentions in refusals:
            got, answer = post(server, path, body)
            assert_error(got, answer, status, code, mentions)
            assert "\n" not in answer["error"]["message"]
        assert post(server, LOAD, {"lora_name": "c", "lora_path": llama["peft"]["b"]})[0] == 200
        status, answer = post(server, LOAD, {"lora_name": "d", "lora_path": llama["peft"]["b"]})
        assert_error(status, answer, 400, "too_many_adapters", "3 adapters are loaded")
        assert served_ids(server) == {"llama-adapted", "a", "b", "c"}
        no_tracebacks(server)
    finally:
        server.stop()


def served_ids_with_key(server: Server) -> set[str]:
    return {m.id for m in server.client(api_key="k").models.list().data}


def test_a_directory_with_more_adapters_than_max_adapters_is_refused_at_start(llama):
    with pytest.raises(RuntimeError, match="holds 2 LoRA adapters, more than --max-adapters 1"):
        Server(llama["adapted"], "--max-adapters", "1")
    from click.testing import CliRunner

    from lmrt.cli import main

    for args, message in [(["--max-adapters", "0"], "--max-adapters must be an integer of at least 1, got 0"),
                          (["--ray", "--allow-adapter-loading"], "--allow-adapter-loading is not served on Ray")]:  # fmt: skip
        result = CliRunner().invoke(main, ["serve", llama["adapted"], *args])
        assert result.exit_code == 1 and result.stderr.count("\n") == 1 and message in result.stderr, result.output


@pytest.mark.real_model
def test_an_adapter_in_use_is_not_unloaded_and_a_stream_runs_on_while_another_loads(smollm2, tmp_path):
    """SmolLM2, whose streams of a few hundred tokens hold a slot for seconds: an adapter a running
    stream uses, or a queued request, is not unloaded (409, naming it); another adapter loads while
    they run, and answers as the Generator does on a directory it was added to."""
    arch = runtime.LoadedModel(smollm2[0]).manifest.architecture
    q, kv = arch.num_heads * arch.head_size, arch.num_kv_heads * arch.head_size
    peft_s = random_peft(str(tmp_path / "peft-s"), arch, {"q_proj": q, "v_proj": kv}, 4, 0)
    peft_t = random_peft(str(tmp_path / "peft-t"), arch, {"k_proj": kv, "v_proj": kv}, 8, 1)
    served = dir_copy(smollm2[0], str(tmp_path / "served"))
    add_adapter(served, peft_s, "s", **quiet)
    with_t = dir_copy(served, str(tmp_path / "with-t"))
    add_adapter(with_t, peft_t, "t", **quiet)
    server = Server(served, "--slots", "1", "--ctx-size", "512", "--allow-adapter-loading")
    try:  # a first load and unload, so that the one below does not wait for the server to import PEFT's reader
        assert post(server, LOAD, {"lora_name": "w", "lora_path": peft_s})[0] == post(server, UNLOAD, {"lora_name": "w"})[0] == 200
        conn = http.client.HTTPConnection(server.host, int(server.port), timeout=120)
        hold = {"model": "s", "prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": True, "stream": True, "temperature": 0}
        conn.request("POST", "/v1/completions", body=json.dumps(hold), headers={"Content-Type": "application/json"})
        streaming = conn.getresponse()
        assert streaming.status == 200
        wait_for(lambda: server.metric("llamacpp:requests_processing") == 1, "the stream to run")
        assert_error(*post(server, UNLOAD, {"lora_name": "s"}), 409, "adapter_in_use", "'s' is used by 1 running or waiting")
        client, answers = server.client(), {}

        def ask(model: str, prompt: str) -> None:
            answers[model] = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0).choices[0].text

        queued = [threading.Thread(target=ask, args=("served", "The weather today"))]
        queued[0].start()
        wait_for(lambda: server.metric("llamacpp:requests_deferred") == 1, "the base model's request to wait")
        status, answer = post(server, LOAD, {"lora_name": "t", "lora_path": peft_t})
        assert (status, answer) == (200, "Success: LoRA adapter 't' added successfully.")
        queued.append(threading.Thread(target=ask, args=("t", "The weather today")))
        queued[1].start()
        wait_for(lambda: server.metric("llamacpp:requests_deferred") == 2, "the request with t to wait")
        assert server.metric("llamacpp:requests_processing") == 1  # the stream ran on while t loaded
        assert_error(*post(server, UNLOAD, {"lora_name": "t"}), 409, "adapter_in_use", "'t' is used by 1")
        events = [line for line in streaming.read().decode().splitlines() if line.startswith("data: {")]
        conn.close()
        for thread in queued:
            thread.join(120)
        gen_t = runtime.Generator(with_t)
        streamed = "".join(json.loads(line[len("data: ") :])["choices"][0]["text"] for line in events)
        assert streamed == gen_t.generate("Once upon a time", adapter="s", max_new_tokens=300, stop_token_ids=(), temperature=0.0)
        assert answers["t"] == alone(gen_t, "The weather today", "t", 12) != alone(gen_t, "The weather today", None, 12)
        assert answers["served"] == alone(gen_t, "The weather today", None, 12)
        assert post(server, UNLOAD, {"lora_name": "t"})[0] == post(server, UNLOAD, {"lora_name": "s"})[0] == 200
        assert served_ids(server) == {"served"}
        no_tracebacks(server)
    finally:
        server.stop()


def test_speculation_with_an_adapter_keeps_greedy_output(llama):
    """fp32 tiny Llama, a prompt whose text repeats so prompt lookup proposes tokens: with adapter
    "a" the tokens with speculation on are those with it off, and speculation did propose."""
    gen = runtime.Generator(llama["adapted"])
    prompt = llama["encode"](TEXT_A + " " + TEXT_A + " " + TEXT_A[:40])
    options = dict(max_new_tokens=40, stop_token_ids=(), temperature=0.0)
    for adapter in ("a", "b"):
        off = gen.generate_batch([prompt], adapter=adapter, speculation="off", **options)[0][0].token_ids
        proposed = gen.stats.proposed_tokens
        on = gen.generate_batch([prompt], adapter=adapter, speculation="on", **options)[0][0].token_ids
        assert on == off, adapter
        assert gen.stats.proposed_tokens > proposed, "speculation proposed nothing"
    assert off != gen.generate_batch([prompt], speculation="off", **options)[0][0].token_ids


def test_a_freed_slot_goes_to_another_adapter_only_once_no_cached_row_was_computed_with_it(llama):
    """The Engine alone: "a" unloaded after a request left its row cached; "c" (b's matrices) loaded
    then takes a new slot, so the same prompt with "c" finds no prefix computed with "a"; each answer
    is the Generator's; once no row holds a's slot any more, the next adapter takes it."""
    from conftest import wait_until

    from lmrt.runtime.adapters import AdapterChangeError, read_adapter
    from lmrt.runtime.config import ConfigError

    loaded = runtime.LoadedModel(llama["adapted"])
    lora = loaded.manifest.lora
    b = read_adapter(loaded.model_dir, lora.entry("b"), lora), lora.entry("b").scale
    engine = runtime.Engine(loaded, slots=1, ctx_size=64)
    gen = runtime.Generator(llama["adapted"])
    prompt = llama["encode"](TEXT_A)[:12]

    def run(adapter: str) -> list[int]:
        request = engine.submit(engine.request(prompt, loaded.config(adapter=adapter, max_new_tokens=8, stop_token_ids=()), None))
        wait_until(lambda: request.done, 60, "the engine's request")
        return request.choices[0].tokens

    try:
        assert run("a") == greedy_ids(gen, prompt, "a")
        assert engine.unload_adapter("a").result(60) == 1
        assert engine.load_adapter("c", *b).result(60) == 3  # the row of slot 1 still holds a's prefix
        assert run("c") == greedy_ids(gen, prompt, "b")  # from an empty row: nothing of a's reused
        assert engine.unload_adapter("b").result(60) == 2
        assert engine.load_adapter("d", *b).result(60) == 1  # the row now holds c's: slot 1 is free to take
        assert run("d") == greedy_ids(gen, prompt, "b") and loaded.adapter_names == ("d", "c")
        with pytest.raises(AdapterChangeError, match="already loaded"):
            engine.load_adapter("c", *b).result(60)
        with pytest.raises(AdapterChangeError, match="the most this server holds"):
            engine.load_adapter("e", *b, most=2).result(60)
        stale = engine.request(prompt, loaded.config(adapter="c", max_new_tokens=2), None)  # built, then c unloaded
        assert engine.unload_adapter("c").result(60) == 3
        with pytest.raises(ConfigError, match="'c' is not an adapter of this model; it has d"):
            engine.submit(stale)
        assert engine.waiting() == 0
    finally:
        engine.close()


def greedy_ids(gen: runtime.Generator, prompt: list[int], adapter: str) -> list[int]:
    return gen.generate_batch([prompt], adapter=adapter, max_new_tokens=8, stop_token_ids=())[0][0].token_ids
