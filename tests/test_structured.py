"""Structured output: every constrained output is accepted by its constraint (checked with jsonschema
and re, not with the library that made the mask), greedy decoding under a constraint its unconstrained
output already satisfies changes nothing, and bad constraints fail before any generation."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from lmrt import runtime  # noqa: E402
from lmrt.runtime import ConfigError  # noqa: E402

SCHEMAS = {
    "flat": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "age", "ok"],
        "additionalProperties": False,
    },
    "nested_enum_optional": {
        "type": "object",
        "properties": {
            "kind": {"enum": ["cat", "dog", "fox"]},
            "owner": {
                "type": "object",
                "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999}, "nick": {"type": "string", "maxLength": 4}},
                "required": ["id"],
                "additionalProperties": False,
            },
        },
        "required": ["kind", "owner"],
        "additionalProperties": False,
    },
    "bounded_array": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
            "score": {"type": "number", "minimum": -5, "maximum": 5},
        },
        "required": ["tags", "score"],
        "additionalProperties": False,
    },
    "pattern": {
        "type": "object",
        "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}, "code": {"type": "string", "pattern": "^[A-Z]{3}$"}},
        "required": ["date", "code"],
        "additionalProperties": False,
    },
}
PROMPTS = ["The capital of France is", "Numbers too: 1, 2, 3", "Once upon a time"]


@pytest.fixture(scope="module")
def gen(tiny_models):
    return runtime.Generator(tiny_models["llama"][2], provider="cpu")


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_sampled_output_validates_against_its_schema(gen, name):
    schema = SCHEMAS[name]
    results = gen.generate_batch(
        PROMPTS, json_schema=schema, temperature=1.0, seed=7, num_return_sequences=4, max_new_tokens=100
    )
    outputs = [c for completions in results for c in completions]
    assert len(outputs) == 12
    assert len({c.text for c in outputs}) > 6  # the draws differ: the mask leaves the model choices
    for c in outputs:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.text), schema)


def test_regex_and_choices(gen):
    pattern = r"(yes|no), [a-z]{2,6} [0-9]{1,3}\."
    got = gen.generate_batch(PROMPTS, regex=pattern, temperature=1.0, seed=1, num_return_sequences=3, max_new_tokens=40)
    assert [len(cs) for cs in got] == [3] * len(PROMPTS)
    for c in (c for cs in got for c in cs):
        assert c.finish_reason == "stop" and re.fullmatch(pattern, c.text), c
    choices = ["Paris", "Rome", "Tokyo", "New York City"]
    got = gen.generate_batch(PROMPTS, choices=choices, temperature=1.0, seed=2, num_return_sequences=5)
    assert all(c.text in choices and c.finish_reason == "stop" for cs in got for c in cs)
    assert len({c.text for cs in got for c in cs}) > 1


def test_grammar_lark_and_gbnf(gen):
    lark = 'start: item ("," item)*\nitem: /[a-z]{1,5}/ | NUMBER\nNUMBER: /[0-9]{1,3}/'
    gbnf = 'root ::= "(" [a-c]+ ")"'
    for grammar, pattern in ((lark, r"([a-z]{1,5}|[0-9]{1,3})(,([a-z]{1,5}|[0-9]{1,3}))*"), (gbnf, r"\([a-c]+\)")):
        results = gen.generate_batch(PROMPTS, grammar=grammar, temperature=1.0, seed=3, max_new_tokens=60)
        assert [len(cs) for cs in results] == [1] * len(PROMPTS)
        for (c,) in results:
            assert c.finish_reason == "stop" and re.fullmatch(pattern, c.text), c


def test_greedy_under_a_constraint_its_output_satisfies_is_unchanged(gen):
    """Each prompt's unconstrained greedy output, required exactly (as the only choice, and as an
    escaped regex), comes out token for token, with the same finish reason."""
    compared = 0
    for prompt in PROMPTS + ["Small language models", "北京是中国的首都", "Hello world. ", "A runtime reads"]:
        tokens = gen.generate_batch([prompt], max_new_tokens=24, speculation="off")[0][0].token_ids
        clean = [k for k in range(1, len(tokens) + 1) if gen.decode(tokens[:k]) and "\ufffd" not in gen.decode(tokens[:k])]
        for n in {clean[len(clean) // 2], clean[-1]} if clean else ():  # greedy for n tokens is the first n of greedy for more
            text = gen.decode(tokens[:n])
            for constraint in ({"choices": [text, text + "!"]}, {"regex": re.escape(text) + "(!)?"}):
                got = gen.generate_batch([prompt], max_new_tokens=n, **constraint)[0][0]
                assert got.token_ids == tokens[:n] and got.text == text
                assert got.finish_reason == "length"
                compared += 1
    assert compared >= 12, compared


def test_a_complete_output_ends_as_a_stop_token_would(gen):
    """Once nothing may follow, the sequence ends ("stop") without spending its budget; when the
    budget cuts a constrained output short, the reason is "length"."""
    done = gen.generate_batch(PROMPTS, regex="[a-z]{4}", max_new_tokens=30)
    assert all(len(cs[0].text) == 4 and cs[0].finish_reason == "stop" for cs in done)
    cut = gen.generate_batch(PROMPTS, json_schema=SCHEMAS["flat"], max_new_tokens=3)
    assert all(cs[0].finish_reason == "length" and len(cs[0].token_ids) == 3 for cs in cut)
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut[0][0].text)


def test_streams_and_batches_agree(gen):
    """A stream gives what generate_batch gives; rows with constraints beside each other and beside
    an unconstrained stream each get their own output."""
    schema = SCHEMAS["nested_enum_optional"]
    alone = [gen.generate_batch([p], json_schema=schema, temperature=0.8, seed=5, max_new_tokens=80)[0][0].text for p in PROMPTS]
    assert [c[0].text for c in gen.generate_batch(PROMPTS, json_schema=schema, temperature=0.8, seed=5, max_new_tokens=80)] == alone
    free = gen.stream(PROMPTS[0], max_new_tokens=30)
    constrained = gen.stream(PROMPTS[1], json_schema=schema, temperature=0.8, seed=5, max_new_tokens=80)
    pieces_free, pieces = [], []
    for a, b in zip(free, constrained):  # interleaved: both share the decode loop
        pieces_free.append(a)
        pieces.append(b)
    pieces_free += list(free)
    pieces += list(constrained)
    assert "".join(pieces) == alone[1] and constrained.finish_reason == "stop"
    assert "".join(pieces_free) == gen.generate(PROMPTS[0], max_new_tokens=30)


@pytest.mark.parametrize(
    "options, field, words",
    [
        ({"json_schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}, "json_schema", "not a valid JSON schema"),
        ({"json_schema": "{not json"}, "json_schema", "not a valid JSON schema"),
        ({"regex": "(ab"}, "regex", "not a valid regular expression"),
        ({"grammar": "start: missing_rule"}, "grammar", "not a valid grammar"),
        ({"regex": "a", "choices": ["b"]}, "choices", "cannot be combined with regex"),
        ({"choices": ["a", ""]}, "choices", "non-empty strings"),
        ({"regex": "a+", "num_beams": 2}, "num_beams", "beam search does not support"),
    ],
)
def test_bad_constraints_fail_before_generating(gen, options, field, words):
    before = gen.stats.generated_tokens
    with pytest.raises(ConfigError) as e:
        gen.generate("Hello", max_new_tokens=4, **options)
    assert e.value.field == field and words in str(e.value)
    with pytest.raises(ConfigError):
        gen.generate_batch(["Hello", "Hi"], max_new_tokens=4, **options)
    assert gen.stats.generated_tokens == before


def test_without_llguidance_the_error_names_the_extra(tiny_models):
    code = (
        "import sys; sys.modules['llguidance'] = None\n"
        "from lmrt import runtime\n"
        f"gen = runtime.Generator({tiny_models['llama'][2]!r}, provider='cpu')\n"
        "assert gen.generate('Hi', max_new_tokens=3)\n"
        "try:\n    gen.generate('Hi', regex='a+')\nexcept runtime.ConfigError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "regex needs llguidance: pip install 'lmrt[structured]'"


def test_constrained_generation_imports_no_heavy_package(tiny_models):
    code = (
        "import sys\n"
        "from lmrt import runtime\n"
        f"gen = runtime.Generator({tiny_models['llama'][2]!r}, provider='cpu')\n"
        "gen.generate('Hi', json_schema={'type': 'object'}, max_new_tokens=20)\n"
        "gen.generate('Hi', grammar='root ::= \"a\" [b-c]', max_new_tokens=4)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'optimum', 'onnx') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_cli_flags(tiny_models, tmp_path):
    model = tiny_models["llama"][2]
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMAS["flat"]))
    run = lambda *a: subprocess.run([sys.executable, "-m", "lmrt", "generate", model, "Hello", *a], capture_output=True, text=True, timeout=120)  # noqa: E731
    out = run("--json-schema", str(schema), "-n", "100", "-t", "1", "--seed", "4", "--json")
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["finish_reason"] == "stop"
    jsonschema.validate(json.loads(record["text"]), SCHEMAS["flat"])
    out = run("--choice", "left", "--choice", "right", "-t", "1", "--seed", "1")
    assert out.returncode == 0 and out.stdout.strip() in ("left", "right"), out.stderr
    out = run("--regex", "[0-9]{3}")
    assert out.returncode == 0 and re.fullmatch("[0-9]{3}", out.stdout.strip()), out.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "object", "properties": {"a": {"type": 5}}}')
    for args, flag in (
        (("--json-schema", str(bad)), "--json-schema is not a valid JSON schema"),
        (("--regex", "(x"), "--regex is not a valid regular expression"),
        (("--regex", "x", "-b", "2"), "--num-beams must be 1 with regex"),
    ):
        out = run(*args)
        assert out.returncode != 0 and out.stderr.strip().startswith("error:") and flag in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and not out.stdout


# --- the real model ---------------------------------------------------------------------------


@pytest.mark.real_model
def test_smollm2_extracts_city_and_country_as_json(smollm2):
    """Unconstrained, SmolLM2 answers these with prose or other keys; under the schema, with the
    right places."""
    gen = runtime.Generator(smollm2[0])
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    cases = [
        ('Extract the city and its country from the text. Reply with JSON only: {"city": ..., "country": ...}.',
         "I flew to Lyon last spring; Lyon is a city in France.", ("Lyon", "France")),
        ("Extract the city and the country as JSON.", "Text: My sister lives in Osaka, Japan.", ("Osaka", "Japan")),
        ("You extract places from text and answer in JSON.",
         "Where does this happen? 'We spent a week in Madrid, the capital of Spain.'", ("Madrid", "Spain")),
    ]  # fmt: skip
    for system, user, (city, country) in cases:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        stream = gen.chat_stream(messages, json_schema=schema, max_new_tokens=60)
        text = "".join(stream)
        assert stream.finish_reason == "stop", text  # complete, not cut short by max_new_tokens
        answer = json.loads(text)
        jsonschema.validate(answer, schema)
        assert answer == {"city": city, "country": country}
