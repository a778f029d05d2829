"""A pass that checks several positions gives exactly the logits of one-position steps, on every
exported family, in float and with int8 / int4 weights computing in int8: the scratch query row
each attention node runs for a batch of one row (export/graph.py) makes onnxruntime take the same
kernel for both. So "auto" speculation keeps greedy output bit for bit on quantized models too."""

from __future__ import annotations

import numpy as np
import pytest

from lmrt import runtime
from lmrt.runtime.model import LoadedModel
from conftest import FAMILIES, NEW_FAMILIES
from test_speculation import PLAIN, REPEATING

SCHEMES = ("fp32", "int8", "int4")


@pytest.fixture(scope="module")
def variants(tiny_models, family_models, tmp_path_factory):
    """{(family, scheme): model dir} for every family with its float graph and its int8 / int4
    quantizations (int8 compute)."""
    from lmrt.quantize import quantize_directory, scheme_for

    root = tmp_path_factory.mktemp("exact")
    out = {}
    for models in (tiny_models, family_models):
        for family, (_, _, exported) in models.items():
            out[family, "fp32"] = exported
            for name in SCHEMES[1:]:
                target = str(root / f"{family}-{name}")
                quantize_directory(exported, target, scheme_for(name), eval_tokens=256, allow_degraded=True, progress=lambda _: None)
                out[family, name] = target
    return out


def check_against_steps(model: LoadedModel, ids: np.ndarray, prefix: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits of ids[prefix:] after ids[:prefix]: from one pass, and from one-position steps."""
    together, steps = model.new_state(1, ids.shape[0]), model.new_state(1, ids.shape[0])
    model.forward(together, ids[None, :prefix])
    model.forward(steps, ids[None, :prefix])
    one_pass = model.forward(together, ids[None, prefix:])[0].copy()
    one_by_one = np.stack([model.forward(steps, ids[None, i : i + 1])[0, 0].copy() for i in range(prefix, ids.shape[0])])
    return one_pass, one_by_one


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("family", FAMILIES + tuple(NEW_FAMILIES))
def test_a_check_pass_gives_the_logits_of_one_position_steps_bit_for_bit(variants, family, scheme):
    if (family, scheme) not in variants:
        pytest.skip(f"{family} is not exported for the installed onnxruntime")
    model = LoadedModel(variants[family, scheme], provider="cpu")
    assert model.manifest.graph.io.scratch_positions == 1
    rng = np.random.default_rng(7)
    for prefix, k in ((1, 8), (20, 8), (57, 5)):  # past the tiny sliding windows too
        ids = rng.integers(0, model.vocab_size, prefix + k)
        one_pass, one_by_one = check_against_steps(model, ids, prefix)
        np.testing.assert_array_equal(one_pass, one_by_one, err_msg=f"{family} {scheme}: prefix {prefix}")


@pytest.mark.parametrize("scheme", ("int8", "int4"))
@pytest.mark.parametrize("family", FAMILIES + tuple(NEW_FAMILIES))
def test_auto_speculation_on_quantized_models_keeps_greedy_output(variants, family, scheme):
    if (family, scheme) not in variants:
        pytest.skip(f"{family} is not exported for the installed onnxruntime")
    gen = runtime.Generator(variants[family, scheme], provider="cpu")
    before = gen.stats.accepted_tokens
    for prompt in REPEATING + PLAIN:
        auto = gen.generate_batch([prompt], max_new_tokens=40, stop_token_ids=[])[0][0]
        off = gen.generate_batch([prompt], max_new_tokens=40, stop_token_ids=[], speculation="off")[0][0]
        assert auto.token_ids == off.token_ids, (family, scheme, prompt)
    assert gen.stats.accepted_tokens > before  # "auto" speculated, and proposals were accepted


def test_the_scratch_position_fits_at_the_full_context(variants):
    """A row filled to the context length: the last step's scratch row sits at the context length
    itself (the rotary tables hold one row more, the buffers one position more)."""
    model = LoadedModel(variants["llama", "int8"], provider="cpu")
    n = model.context_length
    ids = np.random.default_rng(3).integers(0, model.vocab_size, n)
    one_pass, one_by_one = check_against_steps(model, ids, n - 6)
    np.testing.assert_array_equal(one_pass, one_by_one)
    assert model.new_state(1, n).capacity == n


def test_engine_row_alone_speculates_and_keeps_greedy_output(variants):
    """In the server's engine an int8 row running alone checks proposals, exactly (beside a batch,
    where its steps run attention as one-row passes, "auto" leaves them unchecked: test_speculation)."""
    import threading

    from lmrt.runtime import Engine

    gen = runtime.Generator(variants["qwen2", "int8"], provider="cpu")
    engine = Engine(gen.model, slots=2, ctx_size=128)
    try:
        for prompt in REPEATING:
            config = gen.config(max_new_tokens=30, stop_token_ids=[])
            done, tokens = threading.Event(), []
            request = engine.request(gen.encode(prompt), config, lambda e: (tokens.append(e), e.finish_reason and done.set()))
            engine.submit(request)
            assert done.wait(60)
            off = gen.generate_batch([prompt], max_new_tokens=30, stop_token_ids=[], speculation="off")[0][0]
            assert request.choices[0].tokens == off.token_ids
        assert engine.status().stats.accepted_tokens > 0
    finally:
        engine.close()


def test_auto_leaves_int8_graphs_without_the_scratch_row_alone(tiny_models, tmp_path):
    """A graph exported for onnxruntime 1.19 has no scratch row (that release mis-reads a pass of
    two positions over a cache): there an int8-compute check may flip a near tie, so "auto" does not
    speculate; "on" still does."""
    from lmrt.export import export_model
    from lmrt.quantize import quantize_directory, scheme_for

    plain = str(tmp_path / "plain")
    export_model(tiny_models["llama"][0], plain, target="ort-1.19", progress=lambda _: None)
    out = str(tmp_path / "int8")
    quantize_directory(plain, out, scheme_for("int8"), eval_tokens=256, allow_degraded=True, progress=lambda _: None)
    gen = runtime.Generator(out, provider="cpu")
    assert gen.model.manifest.graph.io.scratch_positions == 0
    before = gen.stats.proposed_tokens
    gen.generate(REPEATING[0], max_new_tokens=30, stop_token_ids=[])
    assert gen.stats.proposed_tokens == before
    gen.generate(REPEATING[0], max_new_tokens=30, stop_token_ids=[], speculation="on")
    assert gen.stats.proposed_tokens > before
