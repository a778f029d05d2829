"""Structured output within its budget: from the completion length measured at the first step up,
every constrained answer is complete and valid (checked with jsonschema, re and a second regex for
the grammar, not with the library that made the mask) and within max_new_tokens; below it, the
answer is cut ("length"); with a far budget the guard changes nothing."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from lmrt import runtime  # noqa: E402
from lmrt.runtime import GenerationConfig, budget  # noqa: E402

NESTED = {  # nested objects and arrays of strings; extra properties allowed at the top
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "place": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "integer"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "tags", "place"],
}
REGEX = r"(yes|no), [a-z]{2,6} [0-9]{1,3}\."
GRAMMAR = 'start: item ("," item)*\nitem: /[a-z]{1,5}/ | NUMBER\nNUMBER: /[0-9]{1,3}/'
GRAMMAR_AS_REGEX = r"([a-z]{1,5}|[0-9]{1,3})(,([a-z]{1,5}|[0-9]{1,3}))*"
CHOICES = ["Paris", "Rome", "Tokyo", "New York City"]
KINDS = {
    "json_schema": ({"json_schema": NESTED}, lambda text: valid_json(text)),
    "regex": ({"regex": REGEX}, lambda text: re.fullmatch(REGEX, text) is not None),
    "grammar": ({"grammar": GRAMMAR}, lambda text: re.fullmatch(GRAMMAR_AS_REGEX, text) is not None),
    "choices": ({"choices": CHOICES}, lambda text: text in CHOICES),
}
PROMPTS = ["The capital of France is", "Numbers too: 1, 2, 3", "Once upon a time"]


@pytest.fixture(scope="module")
def gen(tiny_models):
    return runtime.Generator(tiny_models["llama"][2], provider="cpu")


def first_measure(gen, constraint: dict) -> int:
    """The completion length the guard measures at the first step of ``constraint``."""
    builder = gen._requests
    config = GenerationConfig(**constraint)
    make = builder._constraint(config, gen.model.stop_ids(config))
    fresh = make()
    return len(budget.shortest_completion(fresh.matcher, fresh.guard.vocabulary, 10_000))


def sweep(gen, kind: str, span: int, seeds: int) -> int:
    constraint, valid = KINDS[kind]
    least = first_measure(gen, constraint)
    checked = 0
    for max_new_tokens in range(least, least + span):
        results = gen.generate_batch(
            PROMPTS, temperature=1.0, seed=max_new_tokens, num_return_sequences=seeds,
            max_new_tokens=max_new_tokens, **constraint,
        )  # fmt: skip
        for c in (c for cs in results for c in cs):
            assert len(c.token_ids) <= max_new_tokens
            assert valid(c.text), (max_new_tokens, c.text, c.finish_reason)
            checked += 1
    return checked


@pytest.mark.parametrize("kind", KINDS)
def test_every_answer_within_the_budget_is_complete_and_valid(gen, kind):
    assert sweep(gen, kind, span=12, seeds=3) == 12 * 3 * len(PROMPTS)


def test_a_budget_below_the_first_measure_is_cut_as_before(gen):
    constraint, valid = KINDS["json_schema"]
    least = first_measure(gen, constraint)
    assert least > 4
    results = gen.generate_batch(PROMPTS, max_new_tokens=4, temperature=1.0, seed=1, **constraint)
    for (c,) in results:
        assert c.finish_reason == "length" and len(c.token_ids) == 4 and not valid_json(c.text)


def valid_json(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), NESTED)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


@pytest.mark.parametrize("kind", ["json_schema", "regex", "grammar"])
def test_a_far_budget_changes_nothing(gen, kind, monkeypatch):
    """Greedy and sampled answers with room to spare are the ones the mask alone gives, token for token."""
    constraint, _ = KINDS[kind]
    options = dict(max_new_tokens=120, **constraint)
    guarded = [gen.generate_batch(PROMPTS, **options), gen.generate_batch(PROMPTS, temperature=1.0, seed=5, **options)]
    monkeypatch.setattr(budget.BudgetGuard, "choose", lambda self, sampler, logits, remaining: sampler(logits))
    alone = [gen.generate_batch(PROMPTS, **options), gen.generate_batch(PROMPTS, temperature=1.0, seed=5, **options)]
    room = 120 - 2 * first_measure(gen, constraint) - budget.WATCH  # the guard checks no token before this
    compared = 0
    for ours, theirs in zip(guarded, alone):
        for (a,), (b,) in zip(ours, theirs):
            assert a.token_ids[:room] == b.token_ids[:room]
            compared += 1
    assert compared == 2 * len(PROMPTS) and room > 0


@pytest.mark.real_model
def test_smollm2_answers_are_valid_within_their_budget(smollm2, monkeypatch):
    """SmolLM2 writes long strings: without the guard some of these budgets cut its answers."""
    gen = runtime.Generator(smollm2[0])
    constraint, valid = KINDS["json_schema"]
    least = first_measure(gen, constraint)
    budgets = range(least, least + 24, 6)

    def answers():
        return [
            "".join(gen.stream("Person as JSON: ", max_new_tokens=n, temperature=1.0, seed=seed, **constraint))
            for n in budgets for seed in range(2)
        ]  # fmt: skip

    assert all(valid(text) for text in answers())
    monkeypatch.setattr(budget.BudgetGuard, "choose", lambda self, sampler, logits, remaining: sampler(logits))
    assert not all(valid(text) for text in answers())
