"""The Generator's API: sampling, streaming, stop conditions, configuration and providers."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lmrt import runtime
from lmrt.runtime import GenerationConfig, ManifestError, ProviderError
from lmrt.runtime.stopping import StopCriteria
from conftest import CORPUS


@pytest.fixture(scope="module")
def llama(tiny_models):
    return runtime.Generator(tiny_models["llama"][2], provider="cpu")


def test_seeded_sampling_is_reproducible_and_seeds_differ(llama):
    opts = dict(max_new_tokens=24, temperature=1.0, top_k=50, top_p=0.95, stop_token_ids=[])
    a = llama.stream("Once upon a time", seed=7, **opts)
    b = llama.stream("Once upon a time", seed=7, **opts)
    c = llama.stream("Once upon a time", seed=8, **opts)
    assert "".join(a) == "".join(b)
    "".join(c)
    assert a.token_ids == b.token_ids
    assert len(a.token_ids) == 24
    assert a.token_ids != c.token_ids


def test_stream_joined_equals_generate_and_decode(llama):
    stream = llama.stream("The capital of", max_new_tokens=30, temperature=0.9, seed=3, stop_token_ids=[])
    pieces = list(stream)
    text = llama.generate("The capital of", max_new_tokens=30, temperature=0.9, seed=3, stop_token_ids=[])
    assert "".join(pieces) == text == stream.text
    assert text == llama.decode(stream.token_ids)
    assert stream.finish_reason == "length"
    assert len(pieces) > 1


def stream_pieces(decode, ids, stop=()):
    """Feed finished token ids through a stop callback as the decode loop does: (pieces, reason)."""
    criteria, pieces = StopCriteria(decode, (), stop), []
    for token in ids:
        text, reason = criteria(token)
        pieces.append(text)
        if reason:
            return [p for p in pieces if p], reason
    text, reason = criteria.finish("length")
    return [p for p in pieces + [text] if p], reason


@pytest.mark.parametrize("text", [CORPUS[4], CORPUS[5], "混合 mixed 文字 🚀🚀 and ✨👩‍💻 end"])
def test_streaming_never_splits_a_character(llama, text):
    """Chinese and emoji span several byte-level tokens; no piece may hold half a character."""
    ids = llama.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.encode("utf-8")) // 4  # many characters really are split across tokens
    pieces, reason = stream_pieces(llama.decode, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    assert reason == "length"


def test_stop_string_ends_the_text_before_it(llama):
    text = "The capital of France is Paris. The capital of Italy is Rome."
    ids = llama.encode(text, add_special_tokens=False)
    pieces, reason = stream_pieces(llama.decode, ids, ("Italy", "Paris."))
    assert "".join(pieces) == "The capital of France is "
    assert reason == "stop_string"
    # a stop string that never appears leaves the text whole
    pieces, reason = stream_pieces(llama.decode, ids, ("Berlin",))
    assert "".join(pieces) == text and reason == "length"


def test_stop_string_in_generation(llama):
    full = llama.generate("Small", max_new_tokens=20, stop_token_ids=[])
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip()
    stream = llama.stream("Small", max_new_tokens=20, stop_token_ids=[], stop=[stop])
    text = "".join(stream)
    assert text == full[: full.index(stop)]
    assert stream.finish_reason == "stop_string"


def test_stop_token_ends_generation(llama):
    free = llama.stream("Small", max_new_tokens=12, stop_token_ids=[])
    "".join(free)
    stop_at = free.token_ids[5]
    stream = llama.stream("Small", max_new_tokens=12, stop_token_ids=[stop_at])
    "".join(stream)
    assert stream.token_ids == free.token_ids[: free.token_ids.index(stop_at)]
    assert stream.finish_reason == "stop"


def test_max_new_tokens_capped_by_context(llama):
    n = llama.context_length - 3
    stream = llama.stream([5] * n, max_new_tokens=50, stop_token_ids=[])
    "".join(stream)
    assert len(stream.token_ids) == 3 and stream.finish_reason == "length"


def test_prompt_longer_than_context_is_a_clear_error(llama):
    with pytest.raises(ValueError, match="context is 128"):
        llama.stream([5] * 200)
    with pytest.raises(ValueError, match="empty"):
        llama.stream("")


INVALID = [
    ("max_new_tokens", 0),
    ("max_new_tokens", 2.5),
    ("max_new_tokens", True),
    ("temperature", -0.1),
    ("temperature", float("nan")),
    ("temperature", "hot"),
    ("top_k", -1),
    ("top_k", 1.5),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("presence_penalty", 2.5),
    ("presence_penalty", "high"),
    ("frequency_penalty", -3),
    ("frequency_penalty", float("nan")),
    ("seed", -1),
    ("seed", "abc"),
    ("stop", [""]),
    ("stop", [1]),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", ["2"]),
    ("min_new_tokens", -1),
    ("min_new_tokens", 257),  # more than max_new_tokens (256)
    ("min_p", -0.1),
    ("min_p", 1.5),
    ("no_repeat_ngram_size", -1),
    ("no_repeat_ngram_size", 2.0),
    ("num_beams", 0),
    ("length_penalty", float("inf")),
    ("length_penalty", "long"),
    ("early_stopping", "sometimes"),
    ("early_stopping", 1),
    ("num_return_sequences", 0),
    ("speculation", "sometimes"),
    ("speculation", True),
    ("logits_processors", [1]),
    ("logits_processors", "upper"),
    ("json_schema", 5),
    ("json_schema", ["type", "object"]),
    ("regex", ""),
    ("regex", 3),
    ("grammar", ""),
    ("choices", [""]),
    ("choices", [1, 2]),
    ("adapter", ""),
    ("adapter", 3),
]

CONFLICTING = [
    ({"num_beams": 4, "temperature": 0.7}, "temperature must be 0 with beam search"),
    ({"num_beams": 2, "num_return_sequences": 3}, "cannot exceed num_beams"),
    ({"num_return_sequences": 2}, "needs sampling"),
]


@pytest.mark.parametrize("field,value", INVALID)
def test_invalid_config_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        GenerationConfig(**{field: value})


@pytest.mark.parametrize("options,message", CONFLICTING)
def test_conflicting_options_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**options)


def test_beam_search_overrides_a_sampling_default_but_not_an_explicit_temperature():
    defaults = {"temperature": 0.7, "top_p": 0.9}
    assert GenerationConfig.from_options(defaults, num_beams=3).temperature == 0.0
    with pytest.raises(ValueError, match="beam search"):
        GenerationConfig.from_options(defaults, num_beams=3, temperature=0.5)


def test_every_config_field_has_an_invalid_case():
    assert {f for f, _ in INVALID} == set(GenerationConfig.field_names())


def test_config_is_frozen_and_normalised():
    c = GenerationConfig(stop="END", stop_token_ids=[1, 2], temperature=1)
    assert c.stop == ("END",) and c.stop_token_ids == (1, 2) and isinstance(c.temperature, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.temperature = 0.5  # type: ignore[misc]


def test_unknown_option_is_rejected(llama):
    with pytest.raises(ValueError, match="unknown generation option 'temprature'"):
        llama.generate("hi", temprature=0.5)


def test_model_defaults_apply_and_options_override(llama):
    assert llama.config().temperature == 0.0
    assert llama.config(temperature=0.7).temperature == 0.7


def test_unknown_and_unavailable_providers(tiny_models):
    path = tiny_models["llama"][2]
    with pytest.raises(ProviderError, match="unknown provider 'npu'"):
        runtime.Generator(path, provider="npu")
    available = runtime.available_providers()
    missing = [p for p in ("tensorrt", "cuda") if p not in available]
    if missing:
        with pytest.raises(ProviderError, match="available: auto, .*cpu"):
            runtime.Generator(path, provider=missing[0])
    assert runtime.Generator(path, provider="auto").provider == available[0]
    assert runtime.Generator(path, provider="CPUExecutionProvider").provider == "cpu"


def test_provider_choice_and_tensorrt_options(tmp_path, monkeypatch):
    """The GPU code paths that need no GPU: auto's order, fallbacks and TensorRT's engine cache."""
    from lmrt.runtime.session import provider_chain, resolve_provider

    assert resolve_provider("auto", ["tensorrt", "cuda", "cpu"]) == "tensorrt"
    assert resolve_provider("auto", ["cuda", "cpu"]) == "cuda"
    assert resolve_provider("auto", ["cpu"]) == "cpu"
    monkeypatch.setenv("LMRT_CACHE_DIR", str(tmp_path))
    chain = provider_chain("tensorrt", "/models/smollm2")
    (name, options), *rest = chain
    assert name == "TensorrtExecutionProvider"
    assert options["trt_engine_cache_enable"] is True
    assert options["trt_engine_cache_path"] == os.path.join(str(tmp_path), "tensorrt", "smollm2")
    assert rest == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert provider_chain("cuda", "m") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert provider_chain("cpu", "m") == ["CPUExecutionProvider"]


def test_bad_model_directories(tmp_path, tiny_models):
    with pytest.raises(ManifestError, match="not found"):
        runtime.Generator(tmp_path / "missing")
    with pytest.raises(ManifestError, match="no lmrt.json"):
        runtime.Generator(tmp_path)
    manifest = json.load(open(os.path.join(tiny_models["gpt2"][2], "lmrt.json")))
    manifest["format_version"] = 99
    (tmp_path / "lmrt.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="version 99 is not supported"):
        runtime.Generator(tmp_path)
    manifest["format_version"] = 1  # written before the in-place cache: the graph must be re-exported
    (tmp_path / "lmrt.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="version 1 is not supported.*re-export"):
        runtime.Generator(tmp_path)
    manifest["format_version"] = 2
    (tmp_path / "lmrt.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="model.onnx is missing"):
        runtime.Generator(tmp_path)


def test_generating_never_imports_heavy_packages(tiny_models):
    code = textwrap.dedent(
        f"""
        import sys
        from lmrt import runtime
        gen = runtime.Generator({tiny_models["gpt2"][2]!r})
        text = gen.generate("The capital of", max_new_tokens=8, temperature=0.8, seed=1)
        heavy = sorted(m for m in ("torch", "transformers", "optimum", "onnx") if m in sys.modules)
        print("HEAVY=" + ",".join(heavy), len(text) > 0)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY= True" in out.stdout


def test_missing_onnxruntime_names_the_extras(tiny_models):
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["onnxruntime"] = None  # as if it were not installed
        from lmrt import runtime
        try:
            runtime.Generator({tiny_models["gpt2"][2]!r})
        except ImportError as e:
            print(e)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'lmrt[cpu]'" in out.stdout and "'lmrt[gpu]'" in out.stdout
