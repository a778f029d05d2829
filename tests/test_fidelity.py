"""The exported graph computes what the PyTorch model computes, on tiny random GPT-2 and Llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmrt import runtime
from lmrt.runtime.manifest import load_manifest
from lmrt.runtime.model import OnnxCausalLM

ATOL = 1e-4


def onnx_model(exported):
    return OnnxCausalLM(exported, load_manifest(exported), provider="cpu")


def run_steps(model, chunks):
    """Feed token chunks through the cached graph; returns the logits of each chunk."""
    model.reset()
    total, out = 0, []
    for chunk in chunks:
        ids = np.asarray([chunk], dtype=np.int64)
        total += len(chunk)
        out.append(
            model.forward(
                ids, np.ones((1, total), np.int64), np.arange(total - len(chunk), total, dtype=np.int64)[None]
            )[0]
        )
    return out


def test_prefill_and_cached_decode_match_pytorch(tiny):
    _, torch_model, exported = tiny
    rng = np.random.default_rng(1)
    vocab = torch_model.config.vocab_size
    chunks = [rng.integers(0, vocab, 11).tolist()] + [[int(t)] for t in rng.integers(0, vocab, 6)]
    got = run_steps(onnx_model(exported), chunks)
    past = None
    with torch.no_grad():
        for chunk, logits in zip(chunks, got):
            out = torch_model(input_ids=torch.tensor([chunk]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            np.testing.assert_allclose(logits, out.logits[0].numpy(), atol=ATOL, rtol=0)


def test_cached_decode_equals_full_recompute(tiny):
    _, torch_model, exported = tiny
    ids = np.random.default_rng(2).integers(0, torch_model.config.vocab_size, 20).tolist()
    model = onnx_model(exported)
    full = run_steps(model, [ids])[0]  # [20, vocab] in one pass
    stepped = run_steps(model, [ids[:8]] + [[t] for t in ids[8:]])
    np.testing.assert_allclose(np.concatenate(stepped), full, atol=ATOL, rtol=0)


def test_left_padding_mask_matches_pytorch(tiny):
    """attention_mask zeros (padding) are honoured the way transformers honours them."""
    _, torch_model, exported = tiny
    ids = np.random.default_rng(3).integers(0, torch_model.config.vocab_size, (1, 9))
    mask = np.ones((1, 9), np.int64)
    mask[0, :3] = 0
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    model = onnx_model(exported)
    model.reset()
    got = model.forward(ids, mask, positions)[0]
    with torch.no_grad():
        ref = torch_model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), position_ids=torch.from_numpy(positions)
        ).logits[0].numpy()
    np.testing.assert_allclose(got[3:], ref[3:], atol=ATOL, rtol=0)  # padded rows are undefined


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
    _, qwen2, _ = tiny_models["qwen2"]
    assert qwen2.model.layers[0].self_attn.q_proj.bias is not None  # the biases are really exercised
    _, _, exported = tiny_models["mistral"]
    assert load_manifest(exported).architecture.context_length == 96  # capped at the sliding window
