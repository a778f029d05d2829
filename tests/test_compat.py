"""onnxruntime compatibility: the ``requires`` record export writes, the check on load, export
profiles and their plain-operator fallbacks, ``lmrt info`` / ``lmrt doctor``.

These tests also run under older onnxruntime releases (scripts/compat_matrix.py), where the default
export profile is that release's own."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from conftest import onnx_model, run_steps

from lmrt import runtime
from lmrt.cli import main
from lmrt.export import export_model
from lmrt.export.errors import ExportError
from lmrt.export.graph import ONNXRUNTIME_SINCE, DecoderGraph, GraphBuilder
from lmrt.quantize import QuantizeError, quantize_directory, scheme_for
from lmrt.runtime.compat import PROFILES, CompatError, at_least, check_onnxruntime, profile_for, version_key
from lmrt.runtime.manifest import Architecture, GraphIO

quiet = {"progress": lambda _: None}
PROMPT = "The quick brown fox jumps over the lazy dog"


def op_forms(path: str) -> set[str]:
    """"Op" or "Op.Nbit" for each node of the graph in model directory ``path``."""
    graph = onnx.load(os.path.join(path, "model.onnx"), load_external_data=False).graph
    forms = set()
    for n in graph.node:
        bits = next((a.i for a in n.attribute if a.name == "bits"), None)
        forms.add(f"{n.op_type}.{bits}bit" if bits else n.op_type)
    return forms


def logits(path: str) -> np.ndarray:
    gen = runtime.Generator(path, provider="cpu")
    ids = gen.encode(PROMPT)
    return gen.model.sequence_logits(ids)[None]


def test_versions_map_to_the_newest_profile_they_run():
    assert version_key("1.24.0.dev20250101") == (1, 24, 0) and version_key("1.18.0+cu118") == (1, 18, 0)
    assert at_least("1.23.2", "1.23") and not at_least("1.22.1", "1.23")
    got = {v: profile_for(v).name for v in ("1.19.2", "1.21.1", "1.22.1", "1.23.2", "1.24.4", "2.0.0")}
    assert got == {"1.19.2": "ort-1.19", "1.21.1": "ort-1.20", "1.22.1": "ort-1.22",
                   "1.23.2": "ort-1.23", "1.24.4": "latest", "2.0.0": "latest"}  # fmt: skip
    with pytest.raises(ValueError, match="older than any export profile"):
        profile_for("1.18.1")


def test_export_records_the_onnxruntime_the_graph_needs(tiny_models):
    for family, (_, _, exported) in tiny_models.items():
        m = runtime.load_manifest(exported)
        assert m.requires["target"] == profile_for(ort.__version__).name
        assert m.requires["forms"]["GroupQueryAttention"] == ONNXRUNTIME_SINCE["GroupQueryAttention"]
        newest = max(m.requires["forms"].values(), key=version_key)
        assert m.requires["onnxruntime"] == newest == m.requires["floor"]  # fp32: nothing has a fallback
        assert at_least(ort.__version__, m.requires["onnxruntime"])
        assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} & op_forms(exported)


def test_a_target_without_a_form_the_model_needs_is_refused():
    arch = Architecture("llama", "gemma2", 1, 4, 2, 16, 64, 100, 128)
    graph = DecoderGraph(GraphBuilder(), arch, GraphIO())
    graph.features |= {"GroupQueryAttention", "GroupQueryAttention.softcap"}
    with pytest.raises(ExportError, match=r"needs onnxruntime 1.20 \(GroupQueryAttention.softcap\).*--target ort-1.20"):
        graph.requirement(PROFILES["ort-1.19"])
    assert graph.requirement(PROFILES["ort-1.20"])["onnxruntime"] == "1.20"


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_old_targets_write_plain_operators_with_the_same_weights(tiny_models, tmp_path, precision):
    """ort-1.19 has no 8-bit MatMulNBits or GatherBlockQuantized: those weights are dequantized by
    plain operators from the same codes. With float compute on both sides, the logits agree with
    the fused graph's; the record says what it needs."""
    exported = str(tmp_path / "exported")  # tied embeddings: one 8-bit table gathered and multiplied
    export_model(tiny_models["qwen2"][0], exported, target="ort-1.19", **quiet)
    if runtime.load_manifest(tiny_models["qwen2"][2]).graph.io.scratch_positions:  # exported for 1.20 or newer
        with pytest.raises(QuantizeError, match="export the model with --target ort-1.19 first"):
            quantize_directory(tiny_models["qwen2"][2], str(tmp_path / "refused"), scheme_for(precision), target="ort-1.19", **quiet)
    scheme = dataclasses.replace(scheme_for(precision), compute="float")
    old = quantize_directory(exported, str(tmp_path / "old"), scheme, gguf=None, max_increase=1.0, target="ort-1.19", **quiet)
    forms = op_forms(str(tmp_path / "old"))
    assert "GatherBlockQuantized.8bit" not in forms and "MatMulNBits.8bit" not in forms
    assert ("MatMulNBits.4bit" in forms) == (precision == "int4")
    assert old.requires["onnxruntime"] == "1.19" and old.requires["target"] == "ort-1.19"
    assert "GatherBlockQuantized.8bit.fallback" in old.requires["forms"]
    assert "plain operators instead of" in old.quantization["weights"]
    if not at_least(ort.__version__, "1.23"):  # the fused forms do not load here: the comparison runs where they do
        pytest.skip(f"onnxruntime {ort.__version__} cannot load the fused 8-bit forms to compare with")
    fused = quantize_directory(exported, str(tmp_path / "new"), scheme, gguf=None, max_increase=1.0, target="latest", **quiet)
    assert {"GatherBlockQuantized.8bit", "MatMulNBits.8bit"} <= op_forms(str(tmp_path / "new"))
    assert fused.requires["onnxruntime"] == "1.23" and fused.requires["floor"] == "1.19"
    a, b = logits(str(tmp_path / "old")), logits(str(tmp_path / "new"))
    assert np.abs(a - b).max() / np.abs(b).max() < 1e-4
    assert (a.argmax(-1) == b.argmax(-1)).all()


def test_loading_on_an_older_onnxruntime_fails_in_one_line(tiny_models, tmp_path, monkeypatch):
    path = str(tmp_path / "newer")
    shutil.copytree(tiny_models["llama"][2], path)
    m = runtime.load_manifest(path)
    forms = {**m.requires["forms"], "GatherBlockQuantized.8bit": "1.23"}
    m = dataclasses.replace(m, requires={**m.requires, "onnxruntime": "1.23", "forms": forms})
    m.write(path)
    monkeypatch.setattr(ort, "__version__", "1.20.1")
    with pytest.raises(CompatError) as e:
        runtime.Generator(path)
    message = str(e.value)
    assert "\n" not in message
    assert "needs onnxruntime 1.23 or newer (GatherBlockQuantized.8bit)" in message and "has 1.20.1" in message
    assert "--target ort-1.20" in message
    floor = "1.20" if m.graph.io.scratch_positions else "1.19"  # the scratch attention row needs 1.20
    with pytest.raises(CompatError, match=f"upgrade onnxruntime to {floor} or newer"):
        check_onnxruntime(m, "x", have="1.18.1")
    result = CliRunner().invoke(main, ["generate", path, "hi", "--max-new-tokens", "2"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "has 1.20.1" in result.output


def test_manifests_without_a_record_still_load(tiny_models, tmp_path):
    path = str(tmp_path / "old")
    shutil.copytree(tiny_models["gpt2"][2], path)
    with open(os.path.join(path, "lmrt.json")) as f:
        data = json.load(f)
    del data["requires"]
    with open(os.path.join(path, "lmrt.json"), "w") as f:
        json.dump(data, f)
    assert np.isfinite(logits(path)).all()
    result = CliRunner().invoke(main, ["info", path])
    assert "no onnxruntime recorded" in result.output


def test_quantizing_for_a_target_older_than_the_source_graph_is_refused(tiny_models, tmp_path):
    path = str(tmp_path / "src")
    shutil.copytree(tiny_models["llama"][2], path)
    m = runtime.load_manifest(path)
    dataclasses.replace(m, requires={**m.requires, "forms": {**m.requires["forms"], "GroupQueryAttention.softcap": "1.20"}}).write(path)
    with pytest.raises(QuantizeError, match="GroupQueryAttention.softcap, which target ort-1.19"):
        quantize_directory(path, str(tmp_path / "q"), scheme_for("int4"), gguf=None, target="ort-1.19", **quiet)
    with pytest.raises(QuantizeError, match="unknown target 'ort-9'"):
        quantize_directory(path, str(tmp_path / "q"), scheme_for("int4"), gguf=None, target="ort-9", **quiet)
    assert not os.path.exists(str(tmp_path / "q"))


def test_info_and_doctor_say_what_the_model_needs_and_what_is_here(tiny_models):
    exported = tiny_models["llama"][2]
    need = runtime.load_manifest(exported).requires["onnxruntime"]
    info = CliRunner().invoke(main, ["info", exported])
    assert info.exit_code == 0
    row = next(line for line in info.output.splitlines() if line.startswith("requires"))
    assert f"onnxruntime {need} or newer" in row and f"installed {ort.__version__}: ok" in row
    doctor = CliRunner().invoke(main, ["doctor", exported])
    assert doctor.exit_code == 0, doctor.output
    rows = dict(line.split(None, 1) if " " in line else (line, "") for line in doctor.output.splitlines())
    assert ort.__version__ in doctor.output and "CPUExecutionProvider" in doctor.output
    assert f"export target {profile_for(ort.__version__).name}" in doctor.output
    assert "GroupQueryAttention" in doctor.output and f"installed {ort.__version__}: ok" in doctor.output
    assert rows["python"].startswith(".".join(map(str, __import__("sys").version_info[:3])))
    bad = CliRunner().invoke(main, ["export", "x", "-o", "y", "--target", "ort-9"])
    assert bad.exit_code == 1 and "unknown target 'ort-9'" in bad.output


def test_steps_of_several_tokens_after_cached_ones_match_one_pass(tiny_models):
    """Chunked prefill over rows that already hold positions equals one pass over the whole prompt
    (onnxruntime 1.19 takes such steps one token at a time; newer releases in one pass)."""
    ids = np.random.default_rng(5).integers(0, 300, 20).tolist()
    model = onnx_model(tiny_models["llama"][2])
    full = run_steps(model, [ids])[0]
    chunked = np.concatenate(run_steps(model, [ids[:5], ids[5:13], ids[13:]]))
    np.testing.assert_allclose(chunked, full, atol=1e-5, rtol=0)
    assert model.model.one_token_steps == (not at_least(ort.__version__, "1.20"))
