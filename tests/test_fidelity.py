"""The exported graph computes what the PyTorch model computes, on tiny random GPT-2, Llama, Qwen2 and
Mistral models."""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest
import torch

from conftest import onnx_model, run_steps, torch_steps
from lmrt import runtime
from lmrt.runtime.manifest import load_manifest
from lmrt.runtime.state_store import CacheFullError

ATOL = 1e-4


def test_prefill_and_cached_decode_match_pytorch(tiny):
    _, torch_model, exported = tiny
    rng = np.random.default_rng(1)
    vocab = torch_model.config.vocab_size
    chunks = [rng.integers(0, vocab, 11).tolist()] + [[int(t)] for t in rng.integers(0, vocab, 6)]
    for got, ref in zip(run_steps(onnx_model(exported), chunks), torch_steps(torch_model, chunks)):
        np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


def test_cached_decode_equals_full_recompute(tiny):
    _, torch_model, exported = tiny
    ids = np.random.default_rng(2).integers(0, torch_model.config.vocab_size, 20).tolist()
    model = onnx_model(exported)
    full = run_steps(model, [ids])[0]  # [20, vocab] in one pass
    stepped = run_steps(model, [ids[:8]] + [[t] for t in ids[8:]])
    np.testing.assert_allclose(np.concatenate(stepped), full, atol=ATOL, rtol=0)


def test_rows_of_different_lengths_step_together(tiny):
    """Prompts of different lengths share a batch: each row is prefilled alone, then all rows take
    decode steps together, each at its own length, and each row's logits are PyTorch's for its text."""
    _, torch_model, exported = tiny
    rng = np.random.default_rng(3)
    vocab = torch_model.config.vocab_size
    prompts = [rng.integers(0, vocab, n) for n in (9, 3, 14)]
    steps = rng.integers(0, vocab, (4, 3))  # [step, row]
    model = onnx_model(exported)
    first = model.prefill(prompts, capacity=20)  # [rows, vocab]
    got = [first] + [model.step(tokens).copy() for tokens in steps]
    assert model.cache.lengths.tolist() == [13, 7, 18]
    for row, prompt in enumerate(prompts):
        text = np.concatenate([prompt, steps[:, row]])
        with torch.no_grad():
            ref = torch_model(input_ids=torch.from_numpy(text[None])).logits[0].numpy()  # [n, vocab]
        for i, logits in enumerate(got):
            np.testing.assert_allclose(logits[row], ref[len(prompt) - 1 + i], atol=ATOL, rtol=0)


def test_logits_only_where_asked(tiny):
    _, _, exported = tiny
    ids = np.random.default_rng(4).integers(0, 50, (1, 12))
    model = onnx_model(exported)
    model.reset(1, 12)
    full = model.forward(ids)[0].copy()  # [12, vocab]
    model.reset(1, 12)
    last = model.forward(ids, keep=3)[0]
    assert last.shape == (3, full.shape[1])
    np.testing.assert_allclose(last, full[-3:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("penalty", [1.0, 3.0])
def test_greedy_32_tokens_identical_to_transformers(tiny, penalty):
    hf_dir, torch_model, exported = tiny
    gen = runtime.Generator(exported, provider="cpu")
    for prompt in ["The capital of France is", "Small models run", "北京是"]:
        ids = gen.encode(prompt)
        with torch.no_grad():
            ref = torch_model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=32,
                eos_token_id=None,  # like stop_token_ids=[] below: never stop early
                do_sample=False,
                repetition_penalty=penalty,
                pad_token_id=0,
            )[0, len(ids) :].tolist()
        stream = gen.stream(ids, max_new_tokens=32, stop_token_ids=[], repetition_penalty=penalty)
        "".join(stream)
        assert stream.token_ids == ref
        assert stream.finish_reason == "length"
        if penalty > 1:
            assert len(set(ref)) > 8  # a varied sequence, so the comparison means something


def test_validation_results_recorded(tiny):
    _, _, exported = tiny
    v = load_manifest(exported).validation
    assert v["passed"] is True
    assert v["max_rel_diff"] <= v["tolerance"]
    assert v["max_abs_diff"] < ATOL
    assert v["greedy_agreement"] == 1.0
    assert v["decode_steps"] >= 4


def test_manifest_describes_the_model(tiny_models):
    _, gpt2, exported = tiny_models["gpt2"]
    m = load_manifest(exported)
    assert (m.architecture.family, m.architecture.num_layers, m.architecture.num_heads) == ("gpt2", 2, 4)
    assert m.architecture.context_length == gpt2.config.n_positions
    _, llama, exported = tiny_models["llama"]
    m = load_manifest(exported)
    assert (m.architecture.num_heads, m.architecture.num_kv_heads, m.architecture.head_size) == (4, 2, 16)
    assert m.tokenizer.eos_token_ids == (llama.config.eos_token_id,)
    assert m.provenance["source_kind"] == "directory"
    assert m.generation_defaults == {"temperature": 0.0}


def test_qwen2_biases_and_mistral_window(tiny_models):
    """Mistral's sliding window applies inside the graph; the context is not capped to it."""
    _, qwen2, _ = tiny_models["qwen2"]
    assert qwen2.model.layers[0].self_attn.q_proj.bias is not None  # the biases are really exercised
    _, mistral, exported = tiny_models["mistral"]
    window = mistral.config.sliding_window
    assert load_manifest(exported).architecture.context_length == mistral.config.max_position_embeddings > window
    ids = np.random.default_rng(5).integers(0, mistral.config.vocab_size, window + 20).tolist()
    chunks = [ids[: window + 12]] + [[t] for t in ids[window + 12 :]]
    got = run_steps(onnx_model(exported), chunks)
    for logits, ref in zip(got, torch_steps(mistral, chunks)):
        np.testing.assert_allclose(logits, ref, atol=ATOL, rtol=0)
    with torch.no_grad():
        mistral.config.sliding_window = None  # the window matters for these positions
        unwindowed = mistral(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
        mistral.config.sliding_window = window
    assert np.abs(unwindowed - got[-1][-1]).max() > 1e-2


def test_graph_is_fused(tiny_models):
    """Attention, norms and projections are onnxruntime's fused operators; nothing concatenates the
    cache; q/k/v (and the Llama gate/up) are one projection each."""
    import onnx

    for family, (_, _, exported) in tiny_models.items():
        graph = onnx.load(os.path.join(exported, "model.onnx"), load_external_data=False).graph
        ops = collections.Counter(n.op_type for n in graph.node)
        manifest = load_manifest(exported)
        layers = manifest.architecture.num_layers
        assert ops["GroupQueryAttention"] == layers, family
        skip = "SkipLayerNormalization" if family == "gpt2" else "SkipSimplifiedLayerNormalization"
        assert ops[skip] == 2 * layers, family  # every norm but the first folds in its residual add
        assert ops["MatMul"] == 4 * layers, family  # qkv, out, (gate_up | fc), down
        scratch = manifest.graph.io.scratch_positions  # each layer gathers its packed qkv with the scratch query row
        assert ops["Gather"] == scratch * layers + (family == "gpt2") + 2, family  # + position table, token table, longest row
        assert ops["Concat"] == 1 and ops["Gemm"] == 1, family  # the logits shape; the vocabulary projection
        cache_inputs = {i.name for i in graph.input if i.name.startswith("past_key_values")}
        assert not any(set(n.input) & cache_inputs for n in graph.node if n.op_type != "GroupQueryAttention")


def test_decode_step_writes_the_cache_in_place(tiny):
    """A step writes one new position per row into the preallocated buffers and copies nothing:
    the buffers keep their addresses, earlier positions keep their bytes, later ones stay zero
    (but for the scratch row's spare position right after the new one, when the graph has it)."""
    _, _, exported = tiny
    model = onnx_model(exported)
    prompt = np.arange(5, 12)
    model.prefill([prompt], capacity=16)
    before = [a.copy() for a in model.cache.buffers.host_arrays()]
    addresses = model.cache.buffers.data_pointers()
    model.step(np.array([7]))
    assert model.cache.buffers.data_pointers() == addresses
    n, spare = len(prompt), load_manifest(exported).graph.io.scratch_positions
    for old, new in zip(before, model.cache.buffers.host_arrays()):  # [1, kv_heads, 16 + spare, head_size]
        assert new.shape[2] == 16 + spare
        np.testing.assert_array_equal(new[:, :, :n], old[:, :, :n])
        assert np.abs(new[:, :, n : n + 1 + spare]).sum(axis=(0, 1, 3)).all() and not new[:, :, n + 1 + spare :].any()
    assert model.cache.lengths.tolist() == [n + 1]
    model.reset(1, 4)
    model.forward(np.arange(4)[None])
    with pytest.raises(CacheFullError, match="needs 5 positions but the cache holds 4"):
        model.step(np.array([1]))
