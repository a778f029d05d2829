"""Quantization on the tiny models: block math, the graph rewrite through onnxruntime, GGUF block
decoding, the quality gate, scoring against transformers, and the CLI."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from lmrt import runtime
from lmrt.cli import main
from lmrt.export import export_model
from lmrt.quantize import QualityGateError, QuantizeError, quantize_directory, scheme_for
from lmrt.quantize.blocks import quantize_asymmetric, quantize_minmax, quantize_symmetric
from lmrt.quantize.gguf_blocks import decode_blocks
from lmrt.quantize.rewrite import quantize_graph
from lmrt.runtime.model_dir import OutputError
from lmrt.runtime.scoring import windows

quiet = {"progress": lambda _: None}
METHODS = {"symmetric": quantize_symmetric, "asymmetric": quantize_asymmetric, "minmax": quantize_minmax}


def leftovers(path) -> list[str]:
    return [p for p in os.listdir(path) if p.startswith(".")]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits", [4, 8])
def test_block_rounding_error_is_at_most_half_a_step(method, bits):
    w = np.random.default_rng(bits).standard_normal((16, 128)).astype(np.float32)
    q = METHODS[method](w, bits, 32)
    assert q.codes.max() < 2**bits and q.codes.shape == (16, 4, 32)
    err = np.abs(q.dequantize() - w).reshape(16, 4, 32).max(-1)
    assert np.all(err <= q.scales * 0.5 + 1e-6)


def _linear_graph(w: np.ndarray, gemm: bool) -> onnx.ModelProto:
    """y = x @ W.T for x [2, 3, K], as MatMul with W.T [K, N] or as Gemm(transB) on a 2D x."""
    n, k = w.shape
    if gemm:
        node = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
        init, x_shape = numpy_helper.from_array(w, "w"), [6, k]
    else:
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        init, x_shape = numpy_helper.from_array(np.ascontiguousarray(w.T), "w"), [2, 3, k]
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [init],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # as exports write


@pytest.mark.parametrize("gemm", [False, True])
@pytest.mark.parametrize("bits,method", [(8, "symmetric"), (8, "asymmetric"), (4, "symmetric"), (4, "asymmetric"), (4, "minmax")])
def test_rewritten_graph_computes_with_the_dequantized_weights(bits, method, gemm):
    """MatMulNBits layout, integer zero points and the float-zero-point split, checked by onnxruntime."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 96)).astype(np.float32)
    q = METHODS[method](w, bits, 32)
    model = _linear_graph(w, gemm)
    counts = quantize_graph(model, lambda kind, name, arr: q, accuracy_level=0, input_ids="none")
    assert counts["quantized"] == {"lm_head" if gemm else "linear": 1}
    assert [n.op_type for n in model.graph.node][0] == "MatMulNBits"
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal([6, 96] if gemm else [2, 3, 96]).astype(np.float32)
    (y,) = session.run(None, {"x": x})
    np.testing.assert_allclose(y, x @ q.dequantize().T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])
def test_gguf_blocks_decode_to_what_gguf_dequantizes(kind):
    """Every kept type, from gguf's own quantizer where it has one and from random blocks (as any
    file may hold them, blocks with scale 0 included) for all."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from conftest import gguf_random_blocks

    qtype = GGMLQuantizationType[kind]
    rng = np.random.default_rng(1)
    raws = [gguf_random_blocks(kind, 8, 512, rng)]
    if kind in ("Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1"):
        w = rng.standard_normal((8, 512)).astype(np.float32)
        w[0, :32] = 0.25  # a constant block: the minimum types store it with d = 0
        raws.append(quantize(w, qtype))
    for raw in raws:
        blocks = decode_blocks(kind, raw)
        expected = dequantize(raw, qtype)
        assert blocks.block_size in (16, 32) and blocks.bits in (4, 8) and blocks.codes.max() < 2**blocks.bits
        np.testing.assert_allclose(blocks.dequantize(), expected, rtol=1e-6, atol=1e-7 * np.abs(expected).max())


def test_windows_score_every_token_once():
    for n, window, stride in [(10, 4, 2), (100, 32, 16), (33, 32, 32), (5, 8, 4), (64, 16, 1)]:
        scored = []
        for begin, end, first in windows(n, window, stride):
            assert begin < first <= end and end - begin <= window
            scored.extend(range(first, end))
        assert scored == list(range(1, n))


def _hf_logprobs(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()


def test_scoring_matches_transformers_in_one_window_and_in_many(tiny_models):
    hf_dir, model, exported = tiny_models["llama"]
    gen = runtime.Generator(exported, provider="cpu")
    ids = gen.encode("The quick brown fox jumps over the lazy dog. " * 6)[:100]
    score = gen.score(ids)
    np.testing.assert_allclose(score.logprobs, _hf_logprobs(model, ids), atol=1e-4)
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert score.perplexity == pytest.approx(np.exp(loss), rel=1e-4)
    windowed = gen.score(ids, window=32, stride=12)
    assert len(windowed.logprobs) == len(ids) - 1 and len(list(windows(len(ids), 32, 12))) > 1
    for begin, end, first in windows(len(ids), 32, 12):
        expected = _hf_logprobs(model, ids[begin:end])[first - begin - 1 :]
        np.testing.assert_allclose(windowed.logprobs[first - 1 : end - 1], expected, atol=1e-4)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_tiny_models_stay_close_to_fp32(tiny, tmp_path, precision):
    hf_dir, model, exported = tiny
    out = str(tmp_path / precision)
    scheme = dataclasses.replace(scheme_for(precision), compute="float")
    m = quantize_directory(exported, out, scheme, gguf=None, max_increase=0.05 if precision == "int8" else 0.5, **quiet)
    q = m.quantization
    assert q["name"] == precision and q["bits"] == int(precision[3]) and q["block_size"] == 32
    assert q["quantized"]["linear"] >= 4 and q["quantized"].get("lm_head", 0) + q["quantized"].get("embedding", 0) >= 1
    assert m.quality["passed"] and m.quality["positions"] >= 500
    # logits of the quantized graph against fp32 on the same tokens
    ids = runtime.Generator(exported).encode("The quick brown fox jumps over the lazy dog")
    ref = runtime.LoadedModel(exported).sequence_logits(ids)[None]  # [1, n, vocab]
    got = runtime.LoadedModel(out).sequence_logits(ids)[None]
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel < (0.02 if precision == "int8" else 0.15)
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) >= (0.9 if precision == "int8" else 0.6)
    assert leftovers(tmp_path) == []


def test_tied_embeddings_share_one_quantized_table(tiny_models, tmp_path):
    exported = tiny_models["qwen2"][2]  # tied
    out = str(tmp_path / "q")
    quantize_directory(exported, out, scheme_for("int8"), gguf=None, max_increase=1.0, **quiet)
    graph = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False).graph
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    head = [n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1] == gather.input[0]]
    assert len(head) == 1
    assert not any(t.name == "model.embed_tokens.weight" for t in graph.initializer)


def test_gate_refuses_a_degraded_model_and_writes_nothing(tiny_models, tmp_path):
    exported = tiny_models["llama"][2]
    broken = dataclasses.replace(scheme_for("int4"), name="int4-symmetric", method="symmetric", head_bits=4)
    out = tmp_path / "broken"
    with pytest.raises(QualityGateError, match=r"quality gate failed: perplexity .* above the allowed \+0\.0%"):
        quantize_directory(exported, str(out), broken, gguf=None, max_increase=0.0, **quiet)
    assert not out.exists() and leftovers(tmp_path) == []
    m = quantize_directory(exported, str(out), broken, gguf=None, max_increase=0.0, allow_degraded=True, **quiet)
    assert m.quality["allowed_degraded"] and not m.quality["passed"]
    assert runtime.load_manifest(str(out)).quality["increase"] > 0


def test_quantize_refuses_bad_input(tiny_models, tmp_path):
    exported = tiny_models["gpt2"][2]
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        scheme_for("int3")
    with pytest.raises(QuantizeError, match="GGUF file not found"):
        quantize_directory(exported, str(tmp_path / "a"), scheme_for("int8"), gguf=str(tmp_path / "no.gguf"), **quiet)
    done = quantize_directory(exported, str(tmp_path / "a"), scheme_for("int8"), gguf=None, max_increase=1.0, **quiet)
    assert done.quantization
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_directory(str(tmp_path / "a"), str(tmp_path / "b"), scheme_for("int4"), **quiet)
    with pytest.raises(OutputError, match="pass --force"):
        quantize_directory(exported, str(tmp_path / "a"), scheme_for("int8"), **quiet)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(QuantizeError, match="needs at least 64"):
        quantize_directory(exported, str(tmp_path / "c"), scheme_for("int8"), eval_text=str(short), **quiet)
    assert leftovers(tmp_path) == []


def test_fp16_export_is_validated_and_generates(tiny_models, tmp_path):
    hf_dir, model, exported = tiny_models["llama"]
    out = str(tmp_path / "fp16")
    m = export_model(hf_dir, out, precision="fp16", **quiet)
    assert m.graph.dtype == "float16" and m.graph.io.kv_dtype == "float16" and m.validation["passed"]
    graph = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False).graph
    assert graph.input[3].type.tensor_type.elem_type == TensorProto.FLOAT16
    fp32, fp16 = runtime.Generator(exported), runtime.Generator(out)
    prompt = "The quick brown fox"
    assert fp16.generate(prompt, max_new_tokens=8) == fp32.generate(prompt, max_new_tokens=8)


def test_cli_export_int8_quantize_and_eval(tiny_models, tmp_path):
    hf_dir, _, exported = tiny_models["gpt2"]
    runner = CliRunner()
    out = str(tmp_path / "int8")
    r = runner.invoke(main, ["export", hf_dir, "-o", out, "--int8", "--max-ppl-increase", "50"])
    assert r.exit_code == 0, r.output
    m = runtime.load_manifest(out)
    assert m.quantization["name"] == "int8" and m.quality["max_increase"] == pytest.approx(0.5)
    assert leftovers(tmp_path) == []
    r = runner.invoke(main, ["info", out])
    assert "quantization   int8: 8-bit symmetric blocks of 32" in r.output and "quality" in r.output

    r = runner.invoke(main, ["quantize", exported, "-o", str(tmp_path / "x")])
    assert r.exit_code == 1 and r.output.strip() == "error: choose --int8 or --int4"
    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    r = runner.invoke(main, ["quantize", exported, "-o", str(tmp_path / "x"), "--int4", "--eval-text", str(short)])
    assert r.exit_code == 1 and r.output.startswith("error: the evaluation text has") and len(r.output.splitlines()) == 1
    assert not (tmp_path / "x").exists()
    r = runner.invoke(main, ["export", hf_dir, "-o", str(tmp_path / "y"), "--allow-degraded"])
    assert r.exit_code == 1 and "apply to --int8 / --int4 only" in r.output

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8, encoding="utf-8")
    r = runner.invoke(main, ["eval", exported, "--text", str(text)])
    assert r.exit_code == 0, r.output
    gen = runtime.Generator(exported)
    expected = gen.score(gen.encode(text.read_text(encoding="utf-8"))).perplexity
    assert float(r.stdout.split()[1]) == pytest.approx(expected, rel=1e-4)
    text.write_bytes(b"\xff\xfe bad")
    r = runner.invoke(main, ["eval", exported, "--text", str(text)])
    assert r.exit_code == 1 and "is not UTF-8 text" in r.output
