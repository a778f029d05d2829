"""LoRA adapters: trained here with PEFT on tiny models, added with ``lmrt adapter``, run by the runtime
against PEFT's own model; mixed batches; quantized bases; every refusal."""

from __future__ import annotations

import copy
import json
import os
import shutil

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_model, wait_until

from lmrt import runtime
from lmrt.cli import main
from lmrt.export import AdapterError, add_adapter, export_model
from lmrt.export.pipeline import DEFAULT_TOLERANCE
from lmrt.quantize import QuantizeError, quantize_directory, scheme_for
from lmrt.runtime.adapters import read_adapter
from lmrt.runtime.config import ConfigError
from lmrt.runtime.model_dir import ManifestError
from lmrt.runtime.sampling import log_softmax

peft = pytest.importorskip("peft")

quiet = {"progress": lambda _: None}
TEXT_A = "The capital of France is Paris. The capital of Italy is Rome. The capital of Japan is Tokyo."
TEXT_B = "Once upon a time there was a quick brown fox who jumped over the lazy dog again and again."
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_lora(model, ids: list[int], out_dir: str, steps: int = 40, lr: float = 2e-2, **options):
    """A LoRA of a copy of ``model`` trained on ``ids`` (a few steps at a high learning rate, so the
    output visibly changes) and saved with PEFT's save_pretrained; returns the PEFT model."""
    torch.manual_seed(0)
    adapted = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(task_type="CAUSAL_LM", **options))
    optimizer = torch.optim.Adam([p for p in adapted.parameters() if p.requires_grad], lr=lr)
    batch = torch.tensor([ids])
    adapted.train()
    for _ in range(steps):
        adapted(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapted.eval()
    adapted.save_pretrained(out_dir)
    return adapted


def torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def torch_greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens, no stop token (compared with lmrt run with stop_token_ids=())."""
    out = list(ids)
    for _ in range(n):
        out.append(int(torch_logits(model, out)[-1].argmax()))
    return out[len(ids) :]


def relative_difference(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def greedy(gen, prompt, adapter=None, n=12) -> list[int]:
    return gen.generate_batch([prompt], adapter=adapter, max_new_tokens=n, stop_token_ids=())[0][0].token_ids


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The tiny Llama exported, two PEFT adapters trained on it ("a": every projection, rank 4; "b":
    q, v and up only, rank 2, rsLoRA), and a copy of the export with both added."""
    root = str(tmp_path_factory.mktemp("lora"))
    hf_dir, model = make_tiny_model("llama", root)
    base = os.path.join(root, "llama-onnx")
    export_model(hf_dir, base, **quiet)
    encode = runtime.LoadedModel(base).encode
    peft_a, peft_b = os.path.join(root, "peft-a"), os.path.join(root, "peft-b")
    model_a = train_lora(model, encode(TEXT_A), peft_a, r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)
    model_b = train_lora(
        model, encode(TEXT_B), peft_b, r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj"]
    )  # fmt: skip
    adapted = os.path.join(root, "llama-adapted")
    shutil.copytree(base, adapted)
    add_adapter(adapted, peft_a, "a", **quiet)
    add_adapter(adapted, peft_b, "b", **quiet)
    return {"root": root, "hf_dir": hf_dir, "model": model, "base": base, "adapted": adapted, "peft": {"a": peft_a, "b": peft_b},
            "torch": {"a": model_a, "b": model_b, None: model}, "encode": encode}  # fmt: skip


def test_the_manifest_lists_each_adapter_and_the_graph_takes_its_inputs(llama):
    manifest = runtime.LoadedModel(llama["adapted"]).manifest
    a, b = manifest.lora.adapters
    assert (a.name, a.rank, a.scale, a.use_rslora) == ("a", 4, 2.0, False)
    assert (b.name, b.rank, b.use_rslora) == ("b", 2, True) and b.scale == pytest.approx(4 / np.sqrt(2))
    assert a.targets == tuple(sorted(f"{'self_attn' if t[0] in 'qkvo' else 'mlp'}.{t}" for t in LLAMA_TARGETS))
    assert b.targets == ("mlp.up_proj", "self_attn.q_proj", "self_attn.v_proj")
    assert len(a.sha256) == 64 and os.path.isfile(os.path.join(llama["adapted"], a.file))
    layers = manifest.architecture.num_layers
    assert sorted(p.projection for p in manifest.lora.inputs) == sorted(
        f"layers.{i}.{n}" for i in range(layers) for n in ("qkv", "out", "up", "down")
    )
    graph = onnx.load(os.path.join(llama["adapted"], manifest.graph.file), load_external_data=False).graph
    names = {i.name for i in graph.input}
    assert all(p.a in names and p.b in names for p in manifest.lora.inputs)
    assert {manifest.lora.index, manifest.lora.valid, manifest.lora.back} <= names
    # a directory without adapters is as it was: no LoRA inputs, nothing loaded
    plain = runtime.LoadedModel(llama["base"])
    assert plain.manifest.lora is None and plain.adapters is None
    assert not [i.name for i in plain.session.get_inputs() if i.name.startswith("lora.")]


def test_a_binding_is_kept_only_while_its_adapter_arrays_are(llama):
    """The same rows' adapters and length give the same key (the decode batch's binding is kept);
    once their arrays were dropped for other rows' and built again, the key is new, so no binding
    points at freed arrays; an adapter added or removed drops every kept set."""
    bank = runtime.LoadedModel(llama["adapted"]).adapters
    rows = np.array([1, 0, 2])
    key = bank.for_rows(rows, 1)[0]
    assert bank.for_rows(rows, 1)[0] == key and bank.for_rows(rows, 2)[0] != key
    for n in range(1, bank.KEPT_PLACES + 2):  # rows of other slots, as many as drop the first
        bank.for_rows(np.array([1] * n), 1)
    assert bank.for_rows(rows, 1)[0] != key
    again = bank.for_rows(rows, 1)[0]
    bank.remove("b")
    assert bank.for_rows(np.array([1, 0]), 1)[0] != again
    matrices = read_adapter(llama["adapted"], bank.lora.entry("b"), bank.lora)
    assert bank.add("c", matrices, 1.0, tagged={2}) == 3  # the freed last slot, which rows are still tagged with, is not taken
    bank.remove("c")
    assert bank.add("c", matrices, 1.0) == 2
    bank.remove("c")
    assert bank.for_rows(np.array([1, 0]), 1)[0] == bank.for_rows(np.array([1, 0]), 1)[0]


def test_the_places_send_each_position_to_its_own_adapter_and_rows_without_one_to_nothing(llama):
    """The inputs for rows of slots [2, 0, 1, 2], 3 positions each: slot 1's and 2's matrices (a
    view of the stack, padded to the larger rank), every position of a row gathered in its
    adapter's group and sent back to itself, a row without one sent to a padding place (valid 0),
    a place added for it only where no group has room."""
    bank = runtime.LoadedModel(llama["adapted"]).adapters
    rows, seq = [2, 0, 1, 2], 3
    bound = bound_inputs(bank, rows, seq)
    lora = bank.lora
    index, valid, back = bound[lora.index], bound[lora.valid][..., 0], bound[lora.back]
    assert index.shape == (2, 2 * seq) and back.shape == (4, seq, 2)  # slot 1's group has room for the padding
    for i, slot in enumerate(rows):
        for j in range(seq):
            g, place = back[i, j]
            if slot == 0:
                assert valid[g, place] == 0
            else:
                assert g == slot - 1 and valid[g, place] == 1 and index[g, place] == i * seq + j
    assert valid.sum() == 3 * seq  # every place that is not padding holds one position
    qkv = next(p for p in lora.inputs if p.projection == "layers.0.qkv")
    a = bound[qkv.a]
    ma, mb = (read_adapter(llama["adapted"], e, lora)["layers.0.qkv.a"] for e in lora.adapters)
    assert a.shape == (2, qkv.in_features, max(ma.shape[1], mb.shape[1]))
    np.testing.assert_array_equal(a[0, :, : ma.shape[1]], ma)
    np.testing.assert_array_equal(a[1, :, : mb.shape[1]], mb)
    assert not a[1, :, mb.shape[1] :].any()  # the smaller rank padded with zeros
    assert bound_inputs(bank, [0, 0], 1)[qkv.a].shape == (1, qkv.in_features, 0)  # no adapter: rank 0, nothing read
    assert bound_inputs(bank, [1, 2, 0], 1)[lora.index].shape == (2, 2)  # every group full: a place more for padding
    assert bound_inputs(bank, [1], 1)[lora.index].shape == (1, 1)  # no padding: a vector-matrix product


def bound_inputs(bank, rows: list[int], seq: int) -> dict[str, np.ndarray]:
    """What ``bank.for_rows`` binds for rows of adapter slots ``rows``, ``seq`` positions each."""
    bound = {}

    class Binding:
        def bind_ortvalue_input(self, name, value):
            bound[name] = value.numpy()

    bank.for_rows(np.array(rows), seq)[1](Binding())
    return bound


def test_each_adapter_records_its_perplexity_with_and_without_it(llama, tmp_path):
    """Added with an evaluation text, the adapter's entry holds that text's perplexity with the
    adapter and with the base model, as Generator.score gives them; the adapter trained on the text
    lowers it; lmrt info shows both. A text too short for the measure is refused before anything is
    written."""
    text = tmp_path / "eval.txt"
    text.write_text((TEXT_A + " ") * 8)
    adapted = str(tmp_path / "adapted")
    shutil.copytree(llama["base"], adapted)
    entry = add_adapter(adapted, llama["peft"]["a"], "a", eval_text=str(text), **quiet)
    gen = runtime.Generator(adapted, provider="cpu")
    ids = gen.encode(text.read_text())[:1024]
    q = entry.quality
    assert (q["eval_text"], q["tokens"]) == ("eval.txt", len(ids))
    assert q["perplexity"] == pytest.approx(gen.score(ids, adapter="a").perplexity, rel=1e-3)
    assert q["base_perplexity"] == pytest.approx(gen.score(ids).perplexity, rel=1e-3)
    assert q["perplexity"] < q["base_perplexity"]  # the adapter was trained on this text
    assert gen.model.manifest.lora.entry("a").quality == q
    shown = CliRunner().invoke(main, ["info", adapted])
    assert f"a (rank 4, 7 modules; perplexity {q['perplexity']:.2f}, base {q['base_perplexity']:.2f} on eval.txt)" in shown.output
    short = tmp_path / "short.txt"
    short.write_text("Paris.")
    plain = str(tmp_path / "plain")
    shutil.copytree(llama["base"], plain)
    with pytest.raises(AdapterError, match="the gate needs at least 64"):
        add_adapter(plain, llama["peft"]["a"], "a", eval_text=str(short), **quiet)
    assert runtime.LoadedModel(plain).manifest.lora is None and not os.path.exists(os.path.join(plain, "adapters"))


@pytest.mark.parametrize("name", ["a", "b"])
def test_logits_with_an_adapter_equal_peft(llama, name):
    ids = llama["encode"](TEXT_A + " " + TEXT_B)
    loaded = runtime.LoadedModel(llama["adapted"])
    ref = torch_logits(llama["torch"][name], ids)
    got = loaded.sequence_logits(ids, adapter=name)
    assert relative_difference(got, ref) < DEFAULT_TOLERANCE
    base = torch_logits(llama["model"], ids)
    assert relative_difference(loaded.sequence_logits(ids), base) < DEFAULT_TOLERANCE  # no adapter: the base model
    assert relative_difference(ref, base) > 100 * DEFAULT_TOLERANCE  # the adapter visibly changes the model
    score = runtime.Generator(loaded).score(ids, adapter=name)
    expected = log_softmax(ref[:-1])[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose(score.logprobs, expected, atol=1e-4)


@pytest.mark.parametrize("name, text", [("a", TEXT_A), ("b", TEXT_B)])
def test_greedy_tokens_with_an_adapter_equal_peft(llama, name, text):
    prompt = llama["encode"](text)[:6]
    gen = runtime.Generator(llama["adapted"])
    expected = torch_greedy(llama["torch"][name], prompt, 12)
    assert greedy(gen, prompt, name) == expected
    assert "".join(gen.stream(prompt, adapter=name, max_new_tokens=12, stop_token_ids=())) == gen.decode(expected)
    assert greedy(gen, prompt) == torch_greedy(llama["model"], prompt, 12) != expected


def test_a_mixed_batch_gives_each_row_what_it_gives_alone(llama):
    gen = runtime.Generator(llama["adapted"])
    prompts = [llama["encode"](TEXT_A)[:6], llama["encode"](TEXT_B)[:5], llama["encode"](TEXT_A)[:6]]
    adapters = ["a", "b", None]
    alone = [greedy(runtime.Generator(llama["adapted"]), p, a) for p, a in zip(prompts, adapters)]
    batch = gen.generate_batch(prompts, adapter=adapters, max_new_tokens=12, stop_token_ids=())
    assert [c[0].token_ids for c in batch] == alone
    assert alone[0] != alone[2]  # the same prompt, with and without the adapter
    sampled = dict(temperature=0.9, seed=3, max_new_tokens=10, num_return_sequences=2, stop_token_ids=())
    together = gen.generate_batch(prompts, adapter=adapters, **sampled)
    for p, a, got in zip(prompts, adapters, together):
        assert [c.token_ids for c in got] == [c.token_ids for c in gen.generate_batch([p], adapter=a, **sampled)[0]]
    with pytest.raises(ValueError, match="one per prompt"):
        gen.generate_batch(prompts, adapter=["a", "b"])


def test_a_row_left_by_one_adapter_is_not_reused_by_another(llama):
    """Prefix reuse: the cache a row kept was computed with its adapter, so a sequence with another
    adapter (or none) on the same prompt computes its own."""
    prompt = llama["encode"](TEXT_A)[:8]
    fresh = [greedy(runtime.Generator(llama["adapted"]), prompt, a) for a in (None, "a", "b")]
    gen = runtime.Generator(llama["adapted"])
    assert [greedy(gen, prompt, a) for a in ("a", None, "b", "a", None)] == [fresh[1], fresh[0], fresh[2], fresh[1], fresh[0]]
    beams = dict(num_beams=2, max_new_tokens=8, stop_token_ids=())
    alone = [runtime.Generator(llama["adapted"]).generate_batch([prompt], adapter=a, **beams)[0][0].token_ids for a in ("a", None)]
    assert gen.generate_batch([prompt], adapter="a", **beams)[0][0].token_ids == alone[0] != alone[1]  # beams too


def test_the_engine_serves_rows_of_different_adapters_together(llama):
    loaded = runtime.LoadedModel(llama["adapted"])
    engine = runtime.Engine(loaded, slots=3, ctx_size=64)
    try:
        prompts = [llama["encode"](TEXT_A)[:6], llama["encode"](TEXT_B)[:5], llama["encode"](TEXT_A)[:6]]
        requests = []
        for p, a in zip(prompts, ["a", "b", None]):
            config = loaded.config(adapter=a, max_new_tokens=10, stop_token_ids=())
            requests.append(engine.submit(engine.request(p, config, on_event=None)))
        for request, p, a in zip(requests, prompts, ["a", "b", None]):
            wait_until(lambda: request.done, 60, "the engine's request")
            assert request.choices[0].tokens == greedy(runtime.Generator(loaded), p, a, 10)
        ids = llama["encode"](TEXT_A)
        expected = runtime.Generator(loaded).score(ids, adapter="a").logprobs
        np.testing.assert_allclose(engine.score(ids, adapter="a").result(timeout=60).logprobs, expected, atol=1e-5)
    finally:
        engine.close()


def test_an_int8_base_keeps_the_adapters_effect(llama, tmp_path):
    int8 = str(tmp_path / "int8")
    quantize_directory(llama["base"], int8, scheme_for("int8"), gguf=None, max_increase=1.0, **quiet)
    add_adapter(int8, llama["peft"]["a"], "a", **quiet)
    fp32, q = runtime.Generator(llama["adapted"]), runtime.Generator(int8)
    assert "MatMulNBits" in {n.op_type for n in onnx.load(os.path.join(int8, q.manifest.graph.file), load_external_data=False).graph.node}
    prompt = llama["encode"](TEXT_A)[:6]
    assert greedy(q, prompt, "a", 8) == greedy(fp32, prompt, "a", 8)
    ids = llama["encode"](TEXT_A)
    adapted, reference, plain = q.score(ids, adapter="a").perplexity, fp32.score(ids, adapter="a").perplexity, q.score(ids).perplexity
    assert adapted < plain / 4  # the adapter's text is far likelier with it than without it
    assert adapted == pytest.approx(reference, rel=0.1)


def test_an_fp16_graph_runs_its_adapters_in_fp16(llama, tmp_path):
    """An fp16 export takes its adapters' matrices in fp16 (B times its scale, then rounded): the
    logits with each adapter stay within the fp16 export tolerance of PEFT's, and a mixed batch
    gives each row its own adapter's tokens."""
    from lmrt.export.pipeline import FP16_TOLERANCE

    fp16 = str(tmp_path / "fp16")
    export_model(llama["hf_dir"], fp16, precision="fp16", **quiet)
    add_adapter(fp16, llama["peft"]["a"], "a", **quiet)
    add_adapter(fp16, llama["peft"]["b"], "b", **quiet)
    loaded = runtime.LoadedModel(fp16)
    assert loaded.manifest.graph.dtype == "float16"
    assert {m.dtype for m in loaded.adapters._stacks.values()} == {np.dtype(np.float16)}
    ids = llama["encode"](TEXT_A + " " + TEXT_B)
    for name in ("a", "b"):
        assert relative_difference(loaded.sequence_logits(ids, adapter=name), torch_logits(llama["torch"][name], ids)) < FP16_TOLERANCE
    gen = runtime.Generator(loaded)
    prompts = [llama["encode"](TEXT_A)[:6], llama["encode"](TEXT_B)[:5]]
    batch = gen.generate_batch(prompts, adapter=["a", "b"], max_new_tokens=8, stop_token_ids=())
    assert [c[0].token_ids for c in batch] == [greedy(gen, p, a, 8) for p, a in zip(prompts, ["a", "b"])]


def test_an_int4_base_keeps_the_adapters_effect(llama, tmp_path):
    int4 = str(tmp_path / "int4")
    quantize_directory(llama["base"], int4, scheme_for("int4"), gguf=None, max_increase=1.0, allow_degraded=True, **quiet)
    add_adapter(int4, llama["peft"]["a"], "a", **quiet)
    q, fp32 = runtime.Generator(int4), runtime.Generator(llama["adapted"])
    ids = llama["encode"](TEXT_A)
    adapted, plain = q.score(ids, adapter="a").perplexity, q.score(ids).perplexity
    assert adapted < plain / 4 and adapted < 2 * fp32.score(ids, adapter="a").perplexity
    with pytest.raises(QuantizeError, match="has LoRA adapters"):
        quantize_directory(llama["adapted"], str(tmp_path / "again"), scheme_for("int8"), gguf=None, **quiet)


def test_the_command_line_adds_an_adapter_and_generates_with_it(llama, tmp_path):
    target = str(tmp_path / "cli")
    shutil.copytree(llama["base"], target)
    runner = CliRunner()
    result = runner.invoke(main, ["adapter", target, llama["peft"]["a"], "--name", "support"])
    assert result.exit_code == 0, result.output
    assert "added adapter support" in result.stderr
    prompt = TEXT_A[:22]
    expected = runtime.Generator(llama["adapted"]).generate(prompt, adapter="a", max_new_tokens=10)
    result = runner.invoke(main, ["generate", target, prompt, "-n", "10", "--adapter", "support"])
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"
    result = runner.invoke(main, ["generate", target, prompt, "--adapter", "nope"])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "--adapter 'nope' is not an adapter of this model; it has support" in result.stderr
    text = tmp_path / "text.txt"
    text.write_text(TEXT_A, encoding="utf-8")
    expected_ppl = runtime.Generator(llama["adapted"]).score(TEXT_A, adapter="a").perplexity
    result = runner.invoke(main, ["eval", target, "--text", str(text), "--adapter", "support"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == f"perplexity {expected_ppl:.4f}"
    sizes = ["--prompt-tokens", "8", "--new-tokens", "4", "--runs", "1"]
    result = runner.invoke(main, ["bench", target, "--adapter", "support", *sizes, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["adapter"] == "support"
    result = runner.invoke(main, ["bench", target, "--adapter", "nope", *sizes])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "'nope' is not an adapter of this model" in result.stderr
    result = runner.invoke(main, ["info", target])
    assert result.exit_code == 0 and "support (rank 4, 7 modules; perplexity " in result.stdout
    result = runner.invoke(main, ["adapter", target, llama["peft"]["a"], "--name", "support"])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "already has an adapter named 'support'" in result.stderr


def test_unknown_adapters_and_damaged_files_are_refused(llama, tmp_path):
    with pytest.raises(ConfigError, match="it has none"):
        runtime.Generator(llama["base"]).generate("The", adapter="a")
    with pytest.raises(ConfigError, match="it has a, b"):
        runtime.Generator(llama["adapted"]).generate("The", adapter="c")
    damaged = str(tmp_path / "damaged")
    shutil.copytree(llama["adapted"], damaged)
    with open(os.path.join(damaged, "adapters", "b", "lora.npz"), "r+b") as f:
        f.seek(100)
        f.write(b"\0\1\2\3")
    with pytest.raises(ManifestError, match="does not match its checksum"):
        runtime.LoadedModel(damaged)
    with open(os.path.join(damaged, "lmrt.json")) as f:
        manifest = json.load(f)
    manifest["lora"]["adapters"][1]["file"] = "../outside.npz"
    with open(os.path.join(damaged, "lmrt.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ManifestError, match="inside the model directory"):
        runtime.LoadedModel(damaged)


def save_untrained(model, out_dir: str, config) -> str:
    peft.get_peft_model(copy.deepcopy(model), config).save_pretrained(out_dir)
    return out_dir


def test_adapters_lmrt_cannot_compute_or_that_belong_elsewhere_are_refused(llama, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model, target = llama["model"], str(tmp_path / "target")
    shutil.copytree(llama["base"], target)
    before = sorted(os.listdir(target))

    def refused(peft_dir: str, match: str, name: str = "x") -> None:
        with pytest.raises(AdapterError, match=match) as info:
            add_adapter(target, peft_dir, name, **quiet)
        assert "\n" not in str(info.value)
        assert sorted(os.listdir(target)) == before  # nothing written

    def lora(path: str, **options) -> str:
        return save_untrained(model, str(tmp_path / path), peft.LoraConfig(task_type="CAUSAL_LM", **options))

    refused(lora("dora", target_modules=["q_proj"], use_dora=True), "DoRA")
    pattern = lora("pattern", target_modules=["q_proj", "v_proj"])
    with open(os.path.join(pattern, "adapter_config.json")) as f:
        config = json.load(f)
    with open(os.path.join(pattern, "adapter_config.json"), "w") as f:
        json.dump({**config, "rank_pattern": {"q_proj(": 2}}, f)
    refused(pattern, r"rank_pattern key 'q_proj\(' is not a regular expression")
    with open(os.path.join(pattern, "adapter_config.json"), "w") as f:
        json.dump({**config, "alpha_pattern": {"q_proj": -1}}, f)
    refused(pattern, "alpha_pattern must map module names to positive numbers")
    refused(lora("bias", target_modules=["q_proj"], bias="lora_only"), "trained biases")
    refused(lora("embed", target_modules=["embed_tokens"]), "embedding")
    refused(lora("head", target_modules=["lm_head"]), "adapts lm_head and holds its weights whole")
    ia3 = save_untrained(model, str(tmp_path / "ia3"), peft.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    refused(ia3, "holds an adapter of PEFT type IA3; lmrt adds LoRA adapters only")
    gpt2 = make_tiny_model("gpt2", str(tmp_path))[1]
    refused(save_untrained(gpt2, str(tmp_path / "gpt2"), peft.LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True)),
            "transformer.h.0.attn.c_attn, which this llama model's graph does not have")  # fmt: skip
    small = LlamaForCausalLM(LlamaConfig(vocab_size=model.config.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))  # fmt: skip
    refused(save_untrained(small, str(tmp_path / "small"), peft.LoraConfig(target_modules=["q_proj"])), "trained on another base model")
    refused(str(tmp_path / "missing"), "not found")
    refused(llama["peft"]["a"], "an adapter name is", name="../x")


@pytest.mark.parametrize("rslora", [False, True])
def test_a_rank_and_alpha_per_module_equal_peft(llama, tmp_path, rslora):
    """PEFT's rank_pattern and alpha_pattern: modules of their own rank and alpha (matched as PEFT
    matches them, by the end of the module's name) give PEFT's logits and greedy tokens."""
    options = dict(r=4, lora_alpha=8, use_rslora=rslora, target_modules=LLAMA_TARGETS,
                   rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6}, alpha_pattern={"v_proj": 32, "gate_proj": 2})  # fmt: skip
    adapted = train_lora(llama["model"], llama["encode"](TEXT_B), str(tmp_path / "peft"), **options)
    assert adapted.base_model.model.model.layers[1].mlp.down_proj.r["default"] == 6  # the pattern took effect in PEFT
    target = str(tmp_path / "model")
    shutil.copytree(llama["base"], target)
    add_adapter(target, str(tmp_path / "peft"), "p", **quiet)
    ids = llama["encode"](TEXT_A + " " + TEXT_B)
    ref = torch_logits(adapted, ids)
    assert relative_difference(runtime.LoadedModel(target).sequence_logits(ids, adapter="p"), ref) < DEFAULT_TOLERANCE
    assert relative_difference(ref, torch_logits(llama["model"], ids)) > 100 * DEFAULT_TOLERANCE
    prompt = llama["encode"](TEXT_B)[:6]
    assert greedy(runtime.Generator(target), prompt, "p") == torch_greedy(adapted, prompt, 12)


@pytest.mark.parametrize("family, targets", [
    ("gpt2", ["c_attn", "c_proj", "c_fc"]),  # q/k/v in one Conv1D (c_attn), weights stored [in, out]
    ("qwen2", ["q_proj", "k_proj", "v_proj", "gate_proj"]),  # q/k/v biases, one KV head: unequal q/k/v columns
    ("mistral", ["q_proj", "v_proj", "down_proj"]),  # a sliding window shorter than the position table
    ("gemma2", ["q_proj", "k_proj", "o_proj", "up_proj"]),  # softcaps, sliding layers
    ("gemma3_text", ["k_proj", "v_proj", "gate_proj", "down_proj"]),  # q/k norms, two rotary tables
    ("phi3", ["qkv_proj", "gate_up_proj", "o_proj"]),  # q/k/v and gate/up fused in the checkpoint already
    ("qwen3", ["q_proj", "v_proj", "up_proj"]),  # q/k norms, tied embeddings
    ("smollm3", ["q_proj", "k_proj", "o_proj", "down_proj"]),  # layers without rotary
    ("granite", ["v_proj", "o_proj", "gate_proj"]),  # multipliers
])  # fmt: skip
def test_other_families_match_peft(tmp_path, family, targets):
    hf_dir, model = make_tiny_model(family, str(tmp_path))
    exported = str(tmp_path / "onnx")
    export_model(hf_dir, exported, **quiet)
    encode = runtime.LoadedModel(exported).encode
    options = {"fan_in_fan_out": True} if family == "gpt2" else {}
    adapted = train_lora(model, encode(TEXT_A), str(tmp_path / "peft"), r=4, lora_alpha=16, target_modules=targets, **options)
    add_adapter(exported, str(tmp_path / "peft"), "a", **quiet)
    ids = encode(TEXT_A + " " + TEXT_B)
    ref = torch_logits(adapted, ids)
    assert relative_difference(runtime.LoadedModel(exported).sequence_logits(ids, adapter="a"), ref) < DEFAULT_TOLERANCE
    assert relative_difference(ref, torch_logits(model, ids)) > 100 * DEFAULT_TOLERANCE
    prompt = ids[:6]
    assert greedy(runtime.Generator(exported), prompt, "a") == torch_greedy(adapted, prompt, 12)


def test_the_server_serves_each_adapter_as_a_model_of_its_own(llama):
    from concurrent.futures import ThreadPoolExecutor

    from serving import Server

    gen = runtime.Generator(llama["adapted"])
    base = os.path.basename(llama["adapted"])
    server = Server(llama["adapted"], "--slots", "3", "--ctx-size", "96")
    try:
        client = server.client()
        cards = {m.id: m for m in client.models.list().data}
        assert set(cards) == {base, "a", "b"}
        assert cards["a"].parent == cards["b"].parent == base and getattr(cards[base], "parent", None) is None
        assert client.models.retrieve("b").parent == base
        asks = [("a", TEXT_A[:22]), ("b", TEXT_B[:16]), (base, TEXT_A[:22])] * 2

        def complete(ask):
            model, prompt = ask
            out = client.completions.create(model=model, prompt=prompt, max_tokens=12)
            return out.model, out.choices[0].text

        with ThreadPoolExecutor(len(asks)) as pool:
            answers = list(pool.map(complete, asks))
        for (model, prompt), (named, text) in zip(asks, answers):
            assert named == model
            assert text == gen.generate(prompt, adapter=None if model == base else model, max_new_tokens=12)
        assert [server.metric(f'lmrt:adapter_requests_total{{adapter="{n}"}}') for n in ("a", "b")] == [2, 2]
        status, body = server.raw("POST", "/v1/completions", json.dumps({"model": "c", "prompt": "x"}).encode())
        assert status == 404 and body["error"]["message"] == f"the model 'c' does not exist; this server serves '{base}', 'a', 'b'"
    finally:
        server.stop()


SMOL_TEXT = (
    "Captain Orla Vennick kept the lighthouse on Gull Rock for forty winters, and every night she wrote "
    "the same line in her log: the lamp is lit, the sea is loud, and the gulls are asleep."
)


@pytest.fixture(scope="module")
def smol_lora(smollm2, tmp_path_factory):
    """SmolLM2 exported in fp32 and quantized to int8, a LoRA of rank 8 on every projection trained
    with PEFT on ``SMOL_TEXT`` (a few steps at a high learning rate), and each directory with it added."""
    root = tmp_path_factory.mktemp("smol-lora")
    encode = runtime.LoadedModel(smollm2[0]).encode
    peft_dir = str(root / "peft")
    adapted_torch = train_lora(smollm2[1], encode(SMOL_TEXT), peft_dir, steps=12, lr=3e-3, r=8, lora_alpha=16, target_modules=LLAMA_TARGETS)
    fp32, int8 = str(root / "fp32"), str(root / "int8")
    shutil.copytree(smollm2[0], fp32)
    quantize_directory(smollm2[0], int8, scheme_for("int8"), gguf=None, eval_tokens=256, **quiet)
    eval_text = root / "eval.txt"
    eval_text.write_text((SMOL_TEXT + " ") * 4)
    for directory in (fp32, int8):
        add_adapter(directory, peft_dir, "log", eval_text=str(eval_text), **quiet)
    return {"fp32": fp32, "int8": int8, "torch": adapted_torch, "base": smollm2[1], "encode": encode}


@pytest.mark.real_model
def test_smollm2_with_a_trained_adapter_equals_peft(smol_lora):
    """SmolLM2 fp32 with the adapter: logits within the export tolerance of PEFT's model, the same
    greedy tokens, which recite the text it was trained on (the base model's do not)."""
    ids = smol_lora["encode"](SMOL_TEXT)
    loaded = runtime.LoadedModel(smol_lora["fp32"])
    ref = torch_logits(smol_lora["torch"], ids)
    assert relative_difference(loaded.sequence_logits(ids, adapter="log"), ref) < DEFAULT_TOLERANCE
    assert relative_difference(ref, torch_logits(smol_lora["base"], ids)) > 100 * DEFAULT_TOLERANCE
    gen, prompt = runtime.Generator(loaded), ids[:12]
    expected = torch_greedy(smol_lora["torch"], prompt, 16)
    assert greedy(gen, prompt, "log", 16) == expected == ids[12:28]  # the trained text, recited
    assert greedy(gen, prompt, None, 16) == torch_greedy(smol_lora["base"], prompt, 16) != expected


@pytest.mark.real_model
def test_smollm2_int8_keeps_a_trained_adapters_effect(smol_lora):
    """On the int8 base the adapter still recites its text, also in a batch beside a row without it,
    and the perplexity recorded when it was added is far below the base model's there
    and close to the fp32 base's with the adapter."""
    ids = smol_lora["encode"](SMOL_TEXT)
    q, fp32 = runtime.Generator(smol_lora["int8"]), runtime.Generator(smol_lora["fp32"])
    prompt = ids[:12]
    assert greedy(q, prompt, "log", 16) == ids[12:28]
    # int8 compute rounds a batch's products otherwise than one row's, so a near tie may go either
    # way (the base model's too): in a mixed batch, the rows with the adapter still recite
    batch = q.generate_batch([prompt, prompt, ids[:20]], adapter=["log", None, "log"], max_new_tokens=12, stop_token_ids=())
    rows = [c[0].token_ids for c in batch]
    assert rows[0] == ids[12:24] != rows[1] and rows[2] == ids[20:32]
    quality = {d: runtime.LoadedModel(d).manifest.lora.entry("log").quality for d in (smol_lora["int8"], smol_lora["fp32"])}
    q8, f32 = quality[smol_lora["int8"]], quality[smol_lora["fp32"]]
    assert q8["perplexity"] < q8["base_perplexity"] / 2  # the text's later copies are easy for the base too
    assert q8["perplexity"] == pytest.approx(f32["perplexity"], rel=0.1)
