"""Prompt-lookup speculation: greedy output is the output without it, sampling keeps the model's
distribution, a seed reproduces, and rejected positions leave the cache as if never written."""

from __future__ import annotations

import numpy as np
import pytest

from lmrt import runtime
from lmrt.runtime.config import GenerationConfig
from lmrt.runtime.sampling import Sampler, make_processors, run_processors
from lmrt.runtime.speculation import PromptLookup, StepCosts, accept, check_beside_a_batch
from conftest import FAMILIES, DirectModel

# Prompts whose continuation repeats them (proposals accepted) and ones that do not.
REPEATING = [
    "one two three four five six seven eight nine ten one two three four five six seven eight nine ten one two three",
    "The capital of France is Paris. The capital of Italy is Rome. The capital of France is Paris. The capital of",
]
PLAIN = ["Once upon a time", "北京是中国的首都。"]


@pytest.fixture(scope="module")
def loaded(tiny_models):
    return {f: runtime.Generator(tiny_models[f][2], provider="cpu") for f in FAMILIES}


def run(gen, prompt, **options):
    stream = gen.stream(prompt, **options)
    text = "".join(stream)
    return text, stream.token_ids, stream.finish_reason


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_with_speculation_equals_without(loaded, family):
    gen = loaded[family]
    for options in (dict(max_new_tokens=40), dict(max_new_tokens=13, stop_token_ids=[]), dict(max_new_tokens=40, repetition_penalty=1.2)):
        before = gen.stats.accepted_tokens
        for prompt in REPEATING + PLAIN:
            assert run(gen, prompt, **options) == run(gen, prompt, speculation="off", **options), (prompt, options)
        assert gen.stats.accepted_tokens > before, options  # speculation really ran and was accepted


def tokens_and_accepted(gen, prompt, **options) -> tuple[list[int], list[int]]:
    """A greedy run's token ids, and the positions of those taken from an accepted proposal: every
    token of one loop step but the step's last (the first token, from the prompt's pass, aside)."""
    tokens, steps = [], []
    for token in gen.iter_tokens(gen.encode(prompt), gen.config(**options)):
        tokens.append(token)
        steps.append(gen.stats.decode_steps)
    return tokens, [i for i in range(1, len(tokens) - 1) if steps[i] == steps[i + 1]]


def test_stop_strings_and_ids_inside_an_accepted_proposal(loaded):
    """A stop token and a stop string first reached by a token of an accepted proposal end the
    output where they end it without speculation."""
    gen = loaded["llama"]
    prompt, grounded = REPEATING[1], dict(max_new_tokens=40, logits_processors=[copy_bias])
    tokens, accepted = tokens_and_accepted(gen, prompt, stop_token_ids=[], **grounded)
    assert tokens == run(gen, prompt, speculation="off", stop_token_ids=[], **grounded)[1]
    at = max(i for i in accepted if tokens[i] not in tokens[:i])  # the token's first occurrence
    text, before = gen.decode(tokens[: at + 1]), gen.decode(tokens[:at])
    assert "\ufffd" not in text and text.startswith(before)
    stop = next(text[-n:] for n in (2, 3, 4) if text[-n:].strip() and text[-n:] not in before)

    def check(options, reason):
        was = gen.stats.accepted_tokens
        got = run(gen, prompt, **grounded, **options)
        assert gen.stats.accepted_tokens > was, options  # it did speculate
        assert got[2] == reason, (options, got)
        assert got == run(gen, prompt, speculation="off", **grounded, **options), options
        return got

    cut_text, cut_ids, _ = check(dict(stop_token_ids=[tokens[at]]), "stop")
    assert cut_ids == tokens[:at] and cut_text == before
    cut_text, _, _ = check(dict(stop_token_ids=[], stop=[stop]), "stop_string")
    assert cut_text == text[: text.index(stop)]
    # stops in the middle of an ungrounded run
    prompt = REPEATING[0]
    text, ids, _ = run(gen, prompt, max_new_tokens=40, speculation="off", stop_token_ids=[])
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip()
    for options in (dict(stop=[stop]), dict(stop_token_ids=[ids[len(ids) // 2]])):
        assert run(gen, prompt, max_new_tokens=40, **options) == run(gen, prompt, max_new_tokens=40, speculation="off", **options)


def test_a_batch_checks_its_rows_proposals_together(loaded):
    """With "on", rows that share a step take it together, then each checks its proposal in a pass of
    its own and keeps only what it took: the batch's output is the output without speculation, in
    fewer steps. "auto" gives that output too (it checks in a batch only where that pays); a row
    whose companions have ended speculates alone."""
    gen = loaded["qwen2"]
    prompts = REPEATING + PLAIN

    def batch(mode):
        before = (gen.stats.decode_steps, gen.stats.proposed_tokens, gen.stats.accepted_tokens)
        out = gen.generate_batch(prompts, max_new_tokens=30, speculation=mode)
        return out, [now - was for now, was in zip((gen.stats.decode_steps, gen.stats.proposed_tokens, gen.stats.accepted_tokens), before)]

    off, (plain_steps, proposed, _) = batch("off")
    assert {c.finish_reason for cs in off for c in cs} == {"length"} and proposed == 0  # every row runs to the end with the others
    on, (steps, proposed, accepted) = batch("on")
    assert on == off
    assert proposed > 0 and accepted > 0 and steps < plain_steps
    assert batch("auto")[0] == off
    # the plain prompt ends early on one of its own tokens, which the repeating one never produces
    plain = gen.generate_batch([PLAIN[0]], max_new_tokens=30, stop_token_ids=[], speculation="off")[0][0].token_ids
    repeating = gen.generate_batch([REPEATING[0]], max_new_tokens=30, stop_token_ids=[], speculation="off")[0][0].token_ids
    stop_id = next(t for t in plain[2:] if t not in repeating)
    options = dict(max_new_tokens=30, stop_token_ids=[stop_id])
    expected = gen.generate_batch([REPEATING[0], PLAIN[0]], speculation="off", **options)
    assert [cs[0].finish_reason for cs in expected] == ["length", "stop"]
    before = gen.stats.proposed_tokens
    assert gen.generate_batch([REPEATING[0], PLAIN[0]], **options) == expected
    assert gen.stats.proposed_tokens > before  # the repeating row, left alone, speculated


def test_beam_search_never_speculates(loaded):
    """Beams run several sequences at once, in their own loop: "on" proposes nothing there, and
    every setting gives the same beams."""
    gen = loaded["qwen2"]
    beams = dict(max_new_tokens=20, num_beams=3, num_return_sequences=2)
    off = gen.generate_batch(REPEATING, speculation="off", **beams)
    assert len(off) == 2 and all(len(cs) == 2 and all(c.token_ids for c in cs) for cs in off)
    for mode in ("auto", "on"):
        before = gen.stats.proposed_tokens
        assert gen.generate_batch(REPEATING, speculation=mode, **beams) == off, mode
        stream = gen.stream(REPEATING[0], speculation=mode, **{**beams, "num_return_sequences": 1})
        assert "".join(stream) == off[0][0].text and stream.token_ids == off[0][0].token_ids, mode
        assert gen.stats.proposed_tokens == before, mode
    before = gen.stats.proposed_tokens
    run(gen, REPEATING[0], max_new_tokens=20, speculation="on")
    assert gen.stats.proposed_tokens > before  # the same prompt without beams does speculate


def copy_bias(token_ids, logits):
    """Makes a random tiny model grounded: the token that followed the newest token's previous
    occurrence gets a large bonus, so the output mostly copies earlier text."""
    earlier = np.flatnonzero(token_ids[:-1] == token_ids[-1])
    if earlier.size:
        logits = logits.copy()
        logits[token_ids[earlier[-1] + 1]] += 8.0
    return logits


def test_sampling_with_speculation_reproduces_with_its_seed(loaded):
    gen = loaded["llama"]
    options = dict(max_new_tokens=40, temperature=1.0, seed=5, speculation="on", stop_token_ids=[], logits_processors=[copy_bias])
    before = gen.stats.proposed_tokens
    first = run(gen, REPEATING[0], **options)
    assert run(gen, REPEATING[0], **options) == first
    assert gen.stats.proposed_tokens > before
    assert run(gen, REPEATING[0], **{**options, "seed": 6}) != first


def test_the_acceptance_rule_keeps_the_models_distribution(loaded):
    """Draws through the rule, with a proposed token, follow the warped model distribution (a
    chi-square test over 20,000 draws); accepting the proposal whenever it is the argmax does not."""
    gen = loaded["llama"]
    config = GenerationConfig(temperature=1.3, top_k=12)
    logits = DirectModel(gen.model).prefill([np.asarray(gen.encode(REPEATING[1]))], capacity=64)[0]
    probs = Sampler(config).probabilities(run_processors(make_processors(config, 0, frozenset()), np.array([], np.int64), logits))
    kept = np.flatnonzero(probs > 0)
    proposed = int(kept[np.argsort(probs[kept])[-2]])  # the second most likely token is proposed
    n = 20000

    def chi2(draws):
        counts = np.bincount(draws, minlength=probs.shape[0])[kept]
        expected = probs[kept] * n
        return float(((counts - expected) ** 2 / expected).sum())

    sampler = Sampler(config, np.random.default_rng(0))
    rule = [accept(sampler, logits, proposed)[0] for _ in range(n)]
    # 11 degrees of freedom: the 0.999 quantile of chi-square is 31.3
    assert chi2(rule) < 31.3
    greedy_rng = np.random.default_rng(0)
    wrong = [proposed if greedy_rng.random() < 0.5 else Sampler(config, greedy_rng)(logits) for _ in range(n)]
    assert chi2(wrong) > 31.3 * 10


def test_the_lookup_proposes_what_followed_the_latest_match_and_backs_off():
    lookup = PromptLookup(max_k=4, max_ngram=3, min_ngram=2)
    history = np.array([5, 6, 7, 8, 9, 1, 2, 6, 7, 3, 4, 5, 6, 7])
    assert lookup.propose(history, room=10).tolist() == [8, 9, 1, 2]  # the 3-gram "5 6 7" wins over "6 7"
    assert lookup.propose(history, room=2).tolist() == [8, 9]
    two = np.array([1, 6, 7, 3, 4, 2, 6, 7, 5, 9, 6, 7])  # only "6 7" repeats: its latest earlier place
    assert lookup.propose(two, room=10).tolist() == [5, 9, 6, 7]
    assert lookup.propose(np.array([1, 2, 3, 4]), room=5).size == 0  # nothing repeats
    lookup.update(4, 4)
    assert lookup.k == 4  # at most max_k
    lookup.update(4, 1)
    assert lookup.k == 2  # what was accepted, and one more
    for _ in range(lookup.patience):
        lookup.update(2, 0)
    assert lookup.propose(history, room=10).size == 0  # paused after repeated misses


def test_a_row_of_a_batch_checks_a_proposal_when_the_tokens_it_promises_outweigh_its_pass():
    """The rule of "auto" beside a batch: passes timed as fixed + per-position seconds; a batch of 4,
    a proposal of 4 tokens checked in a pass of 5 positions. Where reading the weights dominates a
    pass, a proposal from a sequence whose proposals were accepted is checked; where every position
    costs as much as a step, it is not; one whose proposals were rejected is not checked either."""
    def costs(fixed, per_position):
        fitted = StepCosts()
        for positions in (1, 4, 16, 64):
            fitted.record(positions, fixed + per_position * positions)
        return fitted

    assert StepCosts().seconds(4) is None  # nothing timed: no estimate, and no check beside a batch
    weights_bound, compute_bound = costs(0.010, 0.0001), costs(0.0, 0.001)
    assert weights_bound.seconds(20) == pytest.approx(0.012)
    good, bad = PromptLookup(), PromptLookup()
    for _ in range(3):
        good.update(8, 8)
        bad.update(4, 0)
    assert check_beside_a_batch(weights_bound, good, 4, rows=4)
    assert not check_beside_a_batch(compute_bound, good, 4, rows=4)
    assert not check_beside_a_batch(weights_bound, bad, 4, rows=4)
    assert not check_beside_a_batch(StepCosts(), good, 4, rows=4)
    assert check_beside_a_batch(compute_bound, PromptLookup(insist=True), 4, rows=4)  # "on"
    exact_alone = PromptLookup(alone_only=True)  # "auto" on int8 compute: its check is exact only alone
    for _ in range(3):
        exact_alone.update(8, 8)
    assert not check_beside_a_batch(weights_bound, exact_alone, 4, rows=4)


def test_a_rewound_row_keeps_its_earlier_positions(loaded):
    """Speculation truncates rejected positions: earlier ones are untouched, and the next step gives
    what a row that never saw the rejected tokens gives."""
    model = DirectModel(loaded["gpt2"].model)
    ids = np.asarray(loaded["gpt2"].encode(REPEATING[1]))
    model.prefill([ids], capacity=80)
    reference = [a[0, :, : len(ids)].copy() for a in model.cache.buffers.host_arrays()]
    model.forward(np.array([[7, 8, 9]]))  # three positions, then rewound
    model.cache.truncate(0, len(ids))
    assert model.cache.lengths.tolist() == [len(ids)] and model.cache.tokens(0).tolist() == ids.tolist()
    for a, before in zip(model.cache.buffers.host_arrays(), reference):
        np.testing.assert_array_equal(a[0, :, : len(ids)], before)
    after_rewind = model.step(np.array([11])).copy()
    model.prefill([ids], capacity=80)
    np.testing.assert_allclose(after_rewind, model.step(np.array([11])), atol=1e-5)


@pytest.mark.real_model
def test_smollm2_greedy_speculation_equals_without_and_accepts(smollm2):
    gen = runtime.Generator(smollm2[0])
    passage = ("lmrt turns a trained language model into a self-describing ONNX model directory with a fused "
               "graph and an in-place KV cache, checks it against PyTorch while exporting, and runs it with a "
               "small runtime that needs only numpy, onnxruntime and tokenizers.")
    messages = [{"role": "user", "content": f"Repeat this text exactly:\n\n{passage}"}]
    prompt = gen.chat_prompt(messages)
    on = gen.generate_batch([prompt], max_new_tokens=60)[0][0]
    stats = gen.stats
    assert stats.accepted_tokens > 20
    off = gen.generate_batch([prompt], max_new_tokens=60, speculation="off")[0][0]
    assert on == off
