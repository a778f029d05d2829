"""Beam search, the new processors, several sequences per prompt, batched prompts and logits
processors: token for token against transformers' ``generate`` on the tiny models."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from lmrt import runtime
from conftest import FAMILIES

PROMPTS = ["The capital of", "Once upon a time", "北京", "Small models 🙂"]

BEAM_SETTINGS = [
    dict(num_beams=4, max_new_tokens=20),
    dict(num_beams=4, max_new_tokens=20, num_return_sequences=4),
    dict(num_beams=3, max_new_tokens=24, length_penalty=0.5, early_stopping=True, num_return_sequences=3),
    dict(num_beams=5, max_new_tokens=24, length_penalty=2.0, early_stopping="never", num_return_sequences=2),
    dict(num_beams=4, max_new_tokens=24, length_penalty=-1.0, num_return_sequences=2),
    dict(num_beams=2, max_new_tokens=24, no_repeat_ngram_size=2, repetition_penalty=1.3),
    dict(num_beams=4, max_new_tokens=16, min_new_tokens=6, num_return_sequences=4),
]
GREEDY_SETTINGS = [
    dict(max_new_tokens=24, no_repeat_ngram_size=2),
    dict(max_new_tokens=24, no_repeat_ngram_size=3, repetition_penalty=1.5),
    dict(max_new_tokens=16, min_new_tokens=12),
]


@pytest.fixture(scope="module")
def loaded(tiny_models):
    """{family: (Generator, torch model)}"""
    return {f: (runtime.Generator(tiny_models[f][2], provider="cpu"), tiny_models[f][1]) for f in FAMILIES}


@pytest.fixture(scope="module")
def frequent_tokens(loaded):
    """{family: the tokens transformers' beams produce most}: used as stop ids so that beams end
    early and the finishing rules (early stopping, length penalty) decide the results."""
    out = {}
    for family, (gen, model) in loaded.items():
        counts = collections.Counter()
        for prompt in PROMPTS:
            for row in reference(model, gen.encode(prompt), [], num_beams=4, num_return_sequences=4, max_new_tokens=24):
                counts.update(row)
        out[family] = [t for t, _ in counts.most_common(3)]
    return out


def reference(model, prompt_ids, stop_ids, **options) -> list[list[int]]:
    """transformers' generate, each row cut before its first stop token (padding follows it)."""
    ids = torch.tensor([prompt_ids])
    stops = list(stop_ids) or [model.generation_config.eos_token_id]
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=stops, pad_token_id=stops[0], **options
        )
    rows = []
    for row in out[:, ids.shape[1] :].tolist():
        ends = [i for i, t in enumerate(row) if t in stops]
        rows.append(row[: ends[0]] if ends else row)
    return rows


def stop_sets(family, frequent_tokens):
    return [[], frequent_tokens[family][:1], frequent_tokens[family][1:3]]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "settings", BEAM_SETTINGS + GREEDY_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items())
)
def test_beam_search_and_greedy_processors_equal_transformers(loaded, frequent_tokens, family, settings):
    gen, model = loaded[family]
    for stops in stop_sets(family, frequent_tokens):
        for prompt in PROMPTS:
            expected = reference(model, gen.encode(prompt), stops, **settings)
            options = dict(settings, stop_token_ids=stops or None)
            got = gen.generate_batch([prompt], **options)[0]
            assert [c.token_ids for c in got] == expected, (prompt, stops)
            if settings.get("num_return_sequences", 1) == 1:
                stream = gen.stream(prompt, **options)
                assert "".join(stream) == got[0].text and stream.token_ids == expected[0]


def test_beams_end_both_ways_and_are_ranked(loaded, frequent_tokens):
    """The parity tests above cover beams ended by a stop token as well as by length."""
    gen, _ = loaded["llama"]
    reasons = set()
    for prompt in PROMPTS:
        got = gen.generate_batch([prompt], num_beams=4, num_return_sequences=4, max_new_tokens=24,
                                 stop_token_ids=frequent_tokens["llama"][1:3])[0]
        reasons.update(c.finish_reason for c in got)
        scores = [c.score for c in got]
        assert scores == sorted(scores, reverse=True)
    assert reasons == {"stop", "length"}


def test_no_repeat_ngram_output_has_no_repeated_ngram(loaded):
    gen, _ = loaded["gpt2"]
    ids = gen.encode("The capital of")
    plain = ids + gen.generate_batch(["The capital of"], max_new_tokens=60, stop_token_ids=[])[0][0].token_ids
    stream = gen.stream("The capital of", max_new_tokens=60, stop_token_ids=[], no_repeat_ngram_size=2)
    "".join(stream)
    full = ids + stream.token_ids
    bigrams = list(zip(full, full[1:]))
    assert len(bigrams) == len(set(bigrams))
    assert len(set(zip(plain, plain[1:]))) < len(plain) - 1  # without it, this prompt does repeat


def test_min_new_tokens_holds_back_the_stop_token(loaded, frequent_tokens):
    gen, _ = loaded["llama"]
    stops = frequent_tokens["llama"][:1]
    short = gen.stream("Once upon a time", max_new_tokens=40, stop_token_ids=stops)
    "".join(short)
    assert short.finish_reason == "stop"
    n = len(short.token_ids) + 5
    longer = gen.stream("Once upon a time", max_new_tokens=40, stop_token_ids=stops, min_new_tokens=n)
    "".join(longer)
    assert len(longer.token_ids) >= n and longer.token_ids[: len(short.token_ids)] == short.token_ids


# --- several sequences, batches ---------------------------------------------------------------


def test_several_samples_per_prompt_differ_and_repeat_with_the_seed(loaded):
    gen, _ = loaded["llama"]
    options = dict(max_new_tokens=20, temperature=1.0, top_p=0.95, num_return_sequences=4, stop_token_ids=[])
    first = gen.generate_batch(["Once upon a time"], seed=11, **options)[0]
    again = gen.generate_batch(["Once upon a time"], seed=11, **options)[0]
    other = gen.generate_batch(["Once upon a time"], seed=12, **options)[0]
    assert first == again
    assert len({tuple(c.token_ids) for c in first}) == 4
    assert [c.token_ids for c in first] != [c.token_ids for c in other]
    # the first sample is what a stream with the same seed gives
    assert gen.generate("Once upon a time", seed=11, **{k: v for k, v in options.items() if k != "num_return_sequences"}) == first[0].text


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "settings",
    [
        dict(max_new_tokens=24),
        dict(max_new_tokens=24, temperature=0.9, top_k=50, min_p=0.05, seed=3, num_return_sequences=3),
        dict(max_new_tokens=20, num_beams=3, num_return_sequences=2, length_penalty=0.7),
        dict(max_new_tokens=24, repetition_penalty=1.4, no_repeat_ngram_size=2),
    ],
    ids=["greedy", "sampling", "beams", "penalties"],
)
def test_batch_equals_each_prompt_alone(loaded, frequent_tokens, family, settings):
    gen, _ = loaded[family]
    prompts = ["The capital of France is", "北京", "Once upon a time there was a quick", "Emoji 🚀"]
    stops = frequent_tokens[family]
    batch = gen.generate_batch(prompts, stop_token_ids=stops, **settings)
    alone = [gen.generate_batch([p], stop_token_ids=stops, **settings)[0] for p in prompts]
    assert len(batch) == len(prompts)
    for mine, single in zip(batch, alone):
        assert [(c.text, c.token_ids, c.finish_reason) for c in mine] == [
            (c.text, c.token_ids, c.finish_reason) for c in single
        ]
        if "num_beams" in settings:  # the beam score's last float digits may depend on the batch
            np.testing.assert_allclose([c.score for c in mine], [c.score for c in single], rtol=1e-5)
    assert len({len(gen.encode(p)) for p in prompts}) == len(prompts)  # really padded
    if "seed" in settings or "num_beams" in settings:  # rows leave the batch at different steps
        assert {c.finish_reason for results in batch for c in results} == {"stop", "length"}


def test_batched_greedy_equals_transformers(loaded):
    gen, model = loaded["qwen2"]
    prompts = ["The capital of France is", "北京", "Once upon a time there was a quick"]
    for prompt, results in zip(prompts, gen.generate_batch(prompts, max_new_tokens=20, stop_token_ids=[])):
        assert results[0].token_ids == reference(model, gen.encode(prompt), [], max_new_tokens=20)[0]


def test_stop_strings_cut_each_sequence_of_a_batch(loaded):
    gen, _ = loaded["llama"]
    prompts = ["The capital of", "Small"]
    full = gen.generate_batch(prompts, max_new_tokens=30, stop_token_ids=[])
    stop = full[0][0].text[10:13]
    assert stop.strip()
    cut = gen.generate_batch(prompts, max_new_tokens=30, stop_token_ids=[], stop=[stop])
    for prompt, whole, short in zip(prompts, full, cut):
        stream = gen.stream(prompt, max_new_tokens=30, stop_token_ids=[], stop=[stop])
        assert short[0].text == "".join(stream) and short[0].finish_reason == stream.finish_reason
        if stop in whole[0].text:
            assert short[0].text == whole[0].text[: whole[0].text.index(stop)]
            assert short[0].finish_reason == "stop_string"
        else:  # a sequence without the stop string is left whole
            assert (short[0].text, short[0].finish_reason) == (whole[0].text, whole[0].finish_reason)
    assert cut[0][0].finish_reason == "stop_string"


def test_batch_input_errors(loaded):
    gen, _ = loaded["llama"]
    with pytest.raises(ValueError, match="non-empty list of prompts"):
        gen.generate_batch("one prompt")
    with pytest.raises(ValueError, match="the prompt is empty"):
        gen.generate_batch(["fine", ""], max_new_tokens=4)
    with pytest.raises(ValueError, match="use generate_batch"):
        gen.generate("hi", num_return_sequences=2, temperature=1.0)


# --- logits processors -------------------------------------------------------------------------


def test_logits_processors_run_in_order_and_see_the_history(loaded):
    gen, _ = loaded["llama"]
    prompt_ids = gen.encode("The capital of")
    seen = []

    def force(token):
        def processor(token_ids, logits):
            seen.append(token_ids)
            out = np.full_like(logits, -np.inf)
            out[token] = 0.0
            return out

        return processor

    stream = gen.stream(prompt_ids, max_new_tokens=5, stop_token_ids=[], logits_processors=[force(7), force(9)])
    "".join(stream)
    assert stream.token_ids == [9] * 5  # the last processor wins
    assert [len(s) for s in seen[::2]] == [len(prompt_ids) + i for i in range(5)]
    assert seen[-1].tolist() == prompt_ids + [9] * 4
    stream = gen.stream(prompt_ids, max_new_tokens=3, stop_token_ids=[], logits_processors=[force(9), force(7)])
    "".join(stream)
    assert stream.token_ids == [7] * 3


@pytest.mark.parametrize("settings", [dict(max_new_tokens=20), dict(max_new_tokens=20, num_beams=3)])
def test_logits_processor_equals_a_transformers_custom_processor(loaded, settings):
    """A processor banning every third token id gives transformers' result with the same processor."""
    from transformers import LogitsProcessorList

    gen, model = loaded["gpt2"]

    def ban_thirds(token_ids, logits):
        out = logits.copy()
        out[::3] = -np.inf
        return out

    def ban_thirds_torch(input_ids, scores):
        out = scores.clone()
        out[:, ::3] = -float("inf")
        return out

    for prompt in PROMPTS:
        expected = reference(model, gen.encode(prompt), [], logits_processor=LogitsProcessorList([ban_thirds_torch]), **settings)[0]
        got = gen.generate_batch([prompt], stop_token_ids=None, logits_processors=[ban_thirds], **settings)[0][0]
        assert got.token_ids == expected
        # the stop token (0) is banned too, so every sequence runs to its length
        assert len(got.token_ids) == settings["max_new_tokens"] and all(t % 3 for t in got.token_ids)


def test_a_processor_returning_the_wrong_shape_is_named(loaded):
    gen, _ = loaded["llama"]

    def truncate(token_ids, logits):
        return logits[:10]

    with pytest.raises(ValueError, match="logits processor truncate returned shape"):
        gen.generate("hi", max_new_tokens=2, logits_processors=[truncate])
