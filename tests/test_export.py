"""Export: atomic writes, overwrite protection, clear errors for bad sources."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from lmrt import runtime
from lmrt.export import ExportError, export_model
from lmrt.export import architectures
from lmrt.export.source import locate
from lmrt.runtime.model_dir import OutputError

quiet = dict(progress=lambda _: None)


def leftovers(parent):
    return sorted(n for n in os.listdir(parent) if ".partial-" in n)


def test_refuses_to_overwrite_without_force(tiny_models, tmp_path):
    hf_dir = tiny_models["gpt2"][0]
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="already exists; pass --force"):
        export_model(hf_dir, str(out), **quiet)
    with pytest.raises(OutputError, match="not an lmrt model directory"):
        export_model(hf_dir, str(out), force=True, **quiet)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "lmrt.json").write_text("{}")  # an lmrt model directory, however damaged, may be replaced
    export_model(hf_dir, str(out), force=True, **quiet)
    assert not (out / "keep.txt").exists()
    assert runtime.Generator(str(out)).generate("The", max_new_tokens=3, stop_token_ids=[])
    assert leftovers(tmp_path) == []


def test_failed_validation_leaves_nothing(tiny_models, tmp_path):
    out = tmp_path / "model"
    with pytest.raises(ExportError, match="validation failed"):
        export_model(tiny_models["llama"][0], str(out), tolerance=1e-12, **quiet)
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_failure_midway_leaves_nothing_and_keeps_the_old_directory(tiny_models, tmp_path, monkeypatch):
    spec = architectures.REGISTRY["gpt2"]

    def broken_build(g, config, weights, model):
        g.b.weight("some.weight", weights("transformer.wte.weight"))  # get partway in
        raise RuntimeError("disk on fire")

    monkeypatch.setitem(architectures.REGISTRY, "gpt2", spec.__class__(**{**spec.__dict__, "build": broken_build}))
    out = tmp_path / "model"
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_model(tiny_models["gpt2"][0], str(out), **quiet)
    assert not out.exists()
    out.mkdir()
    (out / "lmrt.json").write_text("old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_model(tiny_models["gpt2"][0], str(out), force=True, **quiet)
    assert (out / "lmrt.json").read_text() == "old"
    assert leftovers(tmp_path) == []


def test_sources_share_one_loading_path(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert locate(str(gguf))[0] == "gguf" and locate(str(gguf))[2] == {"gguf_file": "m.gguf"}
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert locate(str(tmp_path / "hf")) == ("directory", str(tmp_path / "hf"), {})
    assert locate("HuggingFaceTB/SmolLM2-135M-Instruct") == ("hub", "HuggingFaceTB/SmolLM2-135M-Instruct", {})
    with pytest.raises(ExportError, match="GGUF file not found"):
        locate(str(tmp_path / "missing.gguf"))
    with pytest.raises(ExportError, match="no config.json"):
        locate(str(tmp_path))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"")
    with pytest.raises(ExportError, match="neither a model directory nor a .gguf"):
        locate(str(other))


def test_hub_id_offline_suggests_local_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(ExportError, match="local model directory or a .gguf file"):
        export_model("gpt2", str(tmp_path / "out"), **quiet)
    assert not (tmp_path / "out").exists()


def write_gguf(path, architecture: str) -> None:
    """A GGUF file of ``architecture`` holding one small float tensor."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unsupported_architecture_is_refused_at_once(tmp_path):
    """Named from config.json or the GGUF header alone, in a fresh interpreter: within seconds, before
    torch or transformers is imported, without reading a weight (these are not even valid files)."""
    directory = tmp_path / "mamba"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    (directory / "model.safetensors").write_bytes(os.urandom(1 << 20))
    gguf = tmp_path / "mamba.gguf"
    write_gguf(gguf, "mamba")
    code = (
        "import sys\n"
        "from lmrt.export import ExportError, export_model\n"
        "for source in sys.argv[1:3]:\n"
        "    try:\n"
        "        export_model(source, sys.argv[3], progress=lambda _: None)\n"
        "    except ExportError as e:\n"
        "        print(e)\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = tmp_path / "out"
    started = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, str(directory), str(gguf), str(out)], capture_output=True, text=True)
    assert time.perf_counter() - started < 5
    lines = r.stdout.splitlines()
    supported = ", ".join(architectures.supported_model_types())
    assert lines[0] == f"{directory}: architecture 'mamba' is not supported yet; supported: {supported}"
    assert lines[1].startswith(f"{gguf}: GGUF architecture 'mamba' is not supported yet; supported from GGUF: gemma2, gemma3,")
    assert "(and from a Hugging Face directory: granite, smollm3)" in lines[1]
    assert lines[2] == "False False"
    assert not out.exists()

    started = time.perf_counter()
    cli = subprocess.run([os.path.join(os.path.dirname(sys.executable), "lmrt"), "export", str(directory), "-o", str(out)],
                         capture_output=True, text=True)  # fmt: skip
    assert time.perf_counter() - started < 5
    assert cli.returncode == 1 and cli.stderr.splitlines()[-1] == f"error: {lines[0]}" and not out.exists()


def test_exported_directory_contents(tiny_models):
    exported = tiny_models["gpt2"][2]
    assert sorted(os.listdir(exported)) == ["lmrt.json", "model.onnx", "model.onnx.data", "tokenizer.json"]
    m = runtime.load_manifest(exported)
    assert m.provenance["lmrt_version"] and m.provenance["export_options"]["dtype"] == "float32"
    assert oct(os.stat(exported).st_mode & 0o777) != "0o700"
