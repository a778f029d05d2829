"""Gemma 2, Gemma 3, Phi-3, Qwen3, SmolLM3 and Granite: tiny random models whose configs exercise
what sets each family apart, against PyTorch and transformers' generate."""

from __future__ import annotations

import collections
import copy
import dataclasses
import os

import numpy as np
import onnx
import pytest
import torch

from conftest import LONGROPE_ORIGINAL, NEW_FAMILIES, WINDOW, make_tiny_model, onnx_model, run_steps, torch_steps
from lmrt import runtime
from lmrt.quantize import quantize_directory, scheme_for
from lmrt.runtime.manifest import load_manifest

ATOL = 1e-4
PROMPTS = ["The capital of France is", "Small models run", "北京是"]


@pytest.fixture(params=list(NEW_FAMILIES))
def family(request, family_models):
    return (request.param, *family_models[request.param])


def chunks_for(vocab: int, prompt: int, steps: int, seed: int = 1) -> list[list[int]]:
    ids = np.random.default_rng(seed).integers(0, vocab, prompt + steps).tolist()
    return [ids[:prompt]] + [[t] for t in ids[prompt:]]


def test_prefill_and_cached_decode_match_pytorch(family):
    """A prompt longer than the sliding windows, then cached steps: every position's logits."""
    name, _, model, exported = family
    chunks = chunks_for(model.config.vocab_size, 3 * WINDOW, 8)
    for got, ref in zip(run_steps(onnx_model(exported), chunks), torch_steps(model, chunks)):
        np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


def assert_greedy_equals_transformers(model, exported, ids: list[int], new_tokens: int, gen=None) -> None:
    """With a repetition penalty, so the tokens vary."""
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=new_tokens,
            eos_token_id=None, do_sample=False, pad_token_id=0, repetition_penalty=3.0,
        )[0, len(ids) :].tolist()  # fmt: skip
    stream = (gen or runtime.Generator(exported, provider="cpu")).stream(
        ids, max_new_tokens=new_tokens, stop_token_ids=[], repetition_penalty=3.0
    )
    "".join(stream)
    assert stream.token_ids == ref
    assert len(set(ref)) > 8  # a varied sequence, so the comparison means something


def test_greedy_32_tokens_identical_to_transformers(family):
    """They run well past the windows."""
    name, _, model, exported = family
    gen = runtime.Generator(exported, provider="cpu")
    for prompt in PROMPTS:
        assert_greedy_equals_transformers(model, exported, gen.encode(prompt), 32)


def test_beam_search_and_batch_equal_transformers(family):
    name, _, model, exported = family
    gen = runtime.Generator(exported, provider="cpu")
    for prompt in PROMPTS[:2]:
        ids = torch.tensor([gen.encode(prompt)])
        with torch.no_grad():
            ref = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=4, num_return_sequences=2,
                max_new_tokens=16, eos_token_id=None, pad_token_id=0,
            )[:, ids.shape[1] :].tolist()  # fmt: skip
        got = gen.generate_batch([prompt], num_beams=4, num_return_sequences=2, max_new_tokens=16, stop_token_ids=[])[0]
        assert [c.token_ids for c in got] == ref, prompt
    batch = gen.generate_batch(PROMPTS, max_new_tokens=16, stop_token_ids=[])
    for prompt, results in zip(PROMPTS, batch):
        ids = torch.tensor([gen.encode(prompt)])
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                                 eos_token_id=None, pad_token_id=0)[0, ids.shape[1] :].tolist()  # fmt: skip
        assert results[0].token_ids == ref, prompt


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_stays_close(family, tmp_path, precision):
    name, _, model, exported = family
    out = str(tmp_path / precision)
    scheme = dataclasses.replace(scheme_for(precision), compute="float")
    m = quantize_directory(exported, out, scheme, gguf=None, max_increase=0.01 if precision == "int8" else 0.05,
                           progress=lambda _: None)  # fmt: skip
    assert m.quantization["quantized"]["linear"] == 4 * m.architecture.num_layers
    chunks = chunks_for(model.config.vocab_size, 64, 0)  # past the windows and the original context
    ref, got = run_steps(onnx_model(exported), chunks)[0], run_steps(onnx_model(out), chunks)[0]
    rel = np.abs(got - ref).max() / np.abs(ref).max()  # int4 on random weights: several percent per layer
    assert rel < (0.03 if precision == "int8" else 0.3), rel
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) >= (0.95 if precision == "int8" else 0.6)


# --- each tiny config really exercises its family's peculiarities ----------------------------------


def without(model, change) -> torch.nn.Module:
    other = copy.deepcopy(model)
    change(other)
    return other


def no_windows(m):
    m.config.sliding_window = 100_000


def no_qk_norm(m):
    for layer in m.model.layers:
        layer.self_attn.q_norm = layer.self_attn.k_norm = torch.nn.Identity()


def no_softcaps(m):
    m.config.final_logit_softcapping = None
    for layer in m.model.layers:
        layer.self_attn.attn_logit_softcapping = None


def rope_everywhere(m):
    for layer in m.model.layers:
        layer.self_attn.use_rope = True


def short_factors_only(m):
    m.config.rope_parameters["long_factor"] = list(m.config.rope_parameters["short_factor"])
    del m.model.rotary_emb.long_inv_freq


def plain_multipliers(m):
    m.config.logits_scaling = 1.0


PECULIARITIES = {
    "gemma2": [no_windows, no_softcaps],
    "gemma3_text": [no_windows, no_qk_norm],
    "phi3": [short_factors_only],
    "qwen3": [no_qk_norm],
    "smollm3": [rope_everywhere],
    "granite": [plain_multipliers],
}


def test_each_peculiarity_changes_the_logits(family):
    """Turning any one of them off in PyTorch changes the logits past the window and the original
    context, so the comparisons above would catch an export that ignored it."""
    name, _, model, _ = family
    chunks = chunks_for(model.config.vocab_size, LONGROPE_ORIGINAL + 4, 4)
    ref = torch_steps(model, chunks)
    for change in PECULIARITIES[name]:
        other = torch_steps(without(model, change), chunks)
        assert max(np.abs(a - b).max() for a, b in zip(ref, other)) > 1e-2, change.__name__


def test_longrope_switches_tables_with_the_length(family_models):
    """Each step rotates with the factors transformers' forward uses for its length: a prefill inside
    the original context then steps across it, and a prefill past it. (transformers' generate also
    feeds the whole sequence again when it first crosses, so that the cached keys take the long
    factors too; the manifest names the length for the runtime to do the same.)"""
    _, model, exported = family_models["phi3"]
    vocab = model.config.vocab_size
    assert load_manifest(exported).architecture.rotary_switch_after == LONGROPE_ORIGINAL
    for chunks in (chunks_for(vocab, LONGROPE_ORIGINAL - 4, 10, seed=5), chunks_for(vocab, LONGROPE_ORIGINAL + 9, 3, seed=6)):
        for got, ref in zip(run_steps(onnx_model(exported), chunks), torch_steps(model, chunks)):
            np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
    rotary = model.model.rotary_emb
    assert rotary.inv_freq.shape[0] * 2 < model.config.hidden_size // model.config.num_attention_heads  # partial


def test_longrope_generation_past_the_original_context_equals_transformers(family_models):
    _, model, exported = family_models["phi3"]
    ids = runtime.Generator(exported, provider="cpu").encode(" ".join(PROMPTS * 6))
    assert len(ids) > LONGROPE_ORIGINAL
    assert_greedy_equals_transformers(model, exported, ids, 24)


def test_longrope_generation_across_the_original_context_equals_transformers(family_models):
    """A prompt inside the original context whose generation crosses it: the row is fed again from
    its start when it crosses (alone, speculating or not, and from a chunked prefill)."""
    _, model, exported = family_models["phi3"]
    gen = runtime.Generator(exported, provider="cpu", prefill_chunk=8)
    text = gen.encode(" ".join(PROMPTS * 6))
    inside, across = text[: LONGROPE_ORIGINAL - 6], text[: LONGROPE_ORIGINAL + 12]
    assert_greedy_equals_transformers(model, exported, inside, 24, gen)  # generation crosses
    assert_greedy_equals_transformers(model, exported, across, 12, gen)  # the chunked prefill crosses
    expected = gen.generate_batch([inside], max_new_tokens=24, speculation="off")[0][0].token_ids
    assert gen.generate_batch([inside], max_new_tokens=24)[0][0].token_ids == expected
    # a row that crossed holds keys rotated with the long table: a prompt staying inside reuses none of them
    gen = runtime.Generator(exported, provider="cpu")
    prompt = "The capital of France is Paris. The capital of Italy is Rome. The capital of France is Paris. The capital of"
    assert len(gen.encode(prompt)) + 8 < LONGROPE_ORIGINAL
    fresh = gen.generate_batch([prompt], max_new_tokens=8, stop_token_ids=[])[0][0].token_ids
    gen.generate_batch([prompt], max_new_tokens=40, stop_token_ids=[])
    assert gen.generate_batch([prompt], max_new_tokens=8, stop_token_ids=[])[0][0].token_ids == fresh


def test_graph_uses_the_attention_node_options(family_models):
    """Windows, softcap, rotary tables and separate q/k/v are the attention node's own options."""
    attrs = {}
    for name, reason in family_models.refused.items():  # an older onnxruntime: windows need 1.24
        assert name in ("gemma2", "gemma3_text") and "needs onnxruntime 1.24" in reason
    for name, (_, _, exported) in family_models.items():
        graph = onnx.load(os.path.join(exported, "model.onnx"), load_external_data=False).graph
        nodes = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
        attrs[name] = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} | {"inputs": len(n.input)} for n in nodes]
        assert len(nodes) == load_manifest(exported).architecture.num_layers
    assert set(attrs) | set(family_models.refused) == set(NEW_FAMILIES)  # each family checked, or refused as above
    if "gemma2" in attrs:
        assert [a["local_window_size"] for a in attrs["gemma2"]] == [WINDOW, -1, WINDOW, -1]
        assert {a["softcap"] for a in attrs["gemma2"]} == {5.0}
    if "gemma3_text" in attrs:
        assert [a["local_window_size"] for a in attrs["gemma3_text"]] == [WINDOW, WINDOW, -1, WINDOW]
        assert all(a["inputs"] == 9 for a in attrs["gemma3_text"])  # q, k, v separate, rotary
    assert "softcap" not in attrs["qwen3"][0] and all(a["inputs"] == 9 for a in attrs["qwen3"])
    assert [a["do_rotary"] for a in attrs["smollm3"]] == [1, 1, 0, 1]


def test_sliding_window_does_not_cap_the_context(family_models):
    for name in ("gemma2", "gemma3_text"):
        _, model, exported = family_models[name]
        assert load_manifest(exported).architecture.context_length == model.config.max_position_embeddings
    counts = collections.Counter(n.op_type for n in onnx.load(
        os.path.join(family_models["phi3"][2], "model.onnx"), load_external_data=False).graph.node)  # fmt: skip
    assert counts["If"] == 1  # the LongRoPE table switch, shared by every layer


def test_graph_records_the_onnxruntime_it_needs(tmp_path):
    """Each graph knows the features it uses, hence the oldest onnxruntime that runs it."""
    from lmrt.export.architectures import Weights, spec_for
    from lmrt.export.graph import DecoderGraph, GraphBuilder
    from lmrt.runtime.manifest import GraphIO

    needs = {}
    for name in NEW_FAMILIES:  # the graphs are built here, whatever the installed onnxruntime exports
        _, model = make_tiny_model(name, str(tmp_path))
        spec = spec_for(model.config.model_type)
        graph = DecoderGraph(GraphBuilder(), spec.describe(model.config), GraphIO())
        spec.build(graph, model.config, Weights(model), model)
        needs[name] = (graph.requires, sorted(f.split(".")[-1] for f in graph.features if "." in f))
    assert needs == {
        "gemma2": ("1.24", ["local_window_size", "softcap"]),
        "gemma3_text": ("1.24", ["local_window_size", "separate_qkv"]),
        "phi3": ("1.19", ["partial_rotary"]),
        "qwen3": ("1.19", ["separate_qkv"]),
        "smollm3": ("1.19", []),
        "granite": ("1.19", []),
    }
