"""Sampling functions agree with transformers' logits processors, and draw from what they keep."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lmrt.runtime import GenerationConfig, sampling


@pytest.fixture
def logits():
    return np.random.default_rng(0).normal(0, 3, 1000).astype(np.float32)


def reference(processor, logits, ids=None):
    ids = torch.tensor([ids if ids is not None else [0]])
    return processor(ids, torch.from_numpy(logits.copy())[None])[0].numpy()


@pytest.mark.parametrize("k", [1, 5, 50, 999])
def test_top_k_matches_transformers(logits, k):
    np.testing.assert_array_equal(sampling.apply_top_k(logits, k), reference(TopKLogitsWarper(k), logits))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_matches_transformers(logits, p):
    np.testing.assert_array_equal(sampling.apply_top_p(logits, p), reference(TopPLogitsWarper(p), logits))


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(logits, penalty):
    previous = [3, 17, 17, 400, 999]
    got = sampling.apply_repetition_penalty(logits, np.asarray(previous), penalty)
    np.testing.assert_allclose(got, reference(RepetitionPenaltyLogitsProcessor(penalty), logits, previous), rtol=1e-6)


@pytest.mark.parametrize("t", [0.3, 1.0, 1.7])
def test_temperature_matches_transformers(logits, t):
    np.testing.assert_allclose(sampling.apply_temperature(logits, t), reference(TemperatureLogitsWarper(t), logits), rtol=1e-6)


def choose(logits, rng, **options):
    config = GenerationConfig(**options)
    processors = sampling.make_processors(config, 0, frozenset())
    return sampling.Sampler(config, rng)(sampling.run_processors(processors, np.array([], np.int64), logits))


def test_greedy_ignores_the_random_generator(logits):
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert choose(logits, rng, temperature=0.0) == int(np.argmax(logits))
    assert rng.bit_generator.state == state  # no draw was made


def test_draws_stay_inside_top_k_and_follow_the_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    rng = np.random.default_rng(1)
    draws = [choose(logits, rng, temperature=1.0, top_k=2) for _ in range(4000)]
    counts = np.bincount(draws, minlength=4)
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] / 4000 - 0.5 / 0.8) < 0.03  # renormalised over the two kept tokens


def test_same_seed_same_draws(logits):
    def draws(seed):
        rng = np.random.default_rng(seed)
        return [choose(logits, rng, temperature=1.0) for _ in range(20)]

    assert draws(5) == draws(5)
    assert draws(5) != draws(6)


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 1.0])
def test_min_p_matches_transformers(logits, p):
    from transformers.generation.logits_process import MinPLogitsWarper

    np.testing.assert_array_equal(sampling.apply_min_p(logits, p), reference(MinPLogitsWarper(p), logits))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_matches_transformers(n):
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    rng = np.random.default_rng(n)
    for _ in range(20):
        previous = rng.integers(0, 6, size=int(rng.integers(1, 40)))  # few distinct ids: many repeats
        scores = rng.normal(size=50).astype(np.float32)
        expected = reference(NoRepeatNGramLogitsProcessor(n), scores, previous.tolist())
        np.testing.assert_array_equal(sampling.apply_no_repeat_ngram(scores, previous, n), expected)


@pytest.mark.parametrize("generated", [0, 3, 4, 9])
def test_min_new_tokens_matches_transformers(logits, generated):
    from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor

    prompt = [5, 6, 7]
    ids = prompt + [8] * generated
    expected = reference(MinNewTokensLengthLogitsProcessor(len(prompt), 4, [2, 17]), logits, ids)
    np.testing.assert_array_equal(sampling.apply_min_new_tokens(logits, generated, 4, frozenset({2, 17})), expected)


def test_min_p_draws_only_from_tokens_it_keeps():
    logits = np.log(np.array([0.5, 0.3, 0.12, 0.08], dtype=np.float32))
    rng = np.random.default_rng(2)
    draws = [choose(logits, rng, temperature=1.0, min_p=0.3) for _ in range(2000)]
    assert set(draws) == {0, 1}  # 0.12 < 0.3 * 0.5


def test_presence_and_frequency_penalties_follow_openais_definition(logits):
    """logit[j] -= presence * (count[j] > 0) + frequency * count[j], counting generated tokens only."""
    prompt = [5, 5, 6]
    generated = [3, 17, 17, 400, 3, 17]
    processors = sampling.make_processors(GenerationConfig(presence_penalty=0.5, frequency_penalty=0.25), len(prompt), frozenset())
    got = sampling.run_processors(processors, np.asarray(prompt + generated), logits)
    expected = logits.copy()
    for token in set(generated):
        expected[token] -= 0.5 + 0.25 * generated.count(token)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got[5] == logits[5]  # prompt tokens are not penalised
