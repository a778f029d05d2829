"""The rest of what the runtime offers, on models of one's own: ``lmrt bench`` and ``lmrt info`` on
every kind (recurrent LSTM and GRU, the stateless GPT, the GPT with its own KV cache, the custom
recurrence with a fixed state), int4 behind its gate, a chat template that comes with a transformers
tokenizer, and structured output (a JSON schema) on a character-level LSTM trained on JSON lines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from test_own_models import (  # noqa: F401 (fixtures)
    CHARS, LstmLM, char_gru, next_logits, one_torch_thread, quantized_export, torch_greedy, train, word_gpt, word_lstm,
)
from test_own_models_state import HEAD_SIZE, HEADS, fading, kv_gpt  # noqa: F401 (fixtures)
from lmrt.cli import main
from lmrt.export import export_model
from lmrt.runtime import Generator
from lmrt.runtime.chat import ChatTemplateError
from lmrt.runtime.state_snapshots import PER_ROW
from lmrt.state_size import size

KINDS = ["word_lstm", "char_gru", "word_gpt", "kv_gpt", "fading"]


def generator_of(request, kind: str) -> Generator:
    return next(x for x in request.getfixturevalue(kind) if isinstance(x, Generator))


def fixed_bytes_of(gen: Generator) -> int:
    """A row's fixed state in bytes, from the manifest's shapes (float32)."""
    return sum(int(np.prod(s.shape)) * 4 for s in gen.manifest.graph.state if s.kind == "fixed")


@pytest.mark.parametrize("kind", KINDS)
def test_lmrt_bench_runs_on_each_kind(kind, request):
    gen = generator_of(request, kind)
    args = ["bench", gen.model_dir, "--prompt-tokens", "4", "--new-tokens", "4", "--runs", "1", "--threads", "1"]
    result = CliRunner().invoke(main, args + ["--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.output)
    assert (r["prompt_tokens"], r["new_tokens"], r["runs"]) == (4, 4, 1) and r["decode_tokens_per_s"] > 0
    kv = 4 * HEADS * HEAD_SIZE * 8 * 4 if kind == "kv_gpt" else 0  # 2 layers x (k, v) over 8 positions, float32
    assert r["kv_cache_mb"] == pytest.approx(kv / 1e6)
    fixed = fixed_bytes_of(gen)
    if fixed:
        expected = f"state 1 x {size(fixed * (2 + PER_ROW))} (each: a row's state, the buffer its next step writes and {PER_ROW} snapshots)"
    else:
        expected = f"KV cache {size(kv)}" if kv else "no state"
    assert r["state"] == expected
    table = CliRunner().invoke(main, args)
    assert table.exit_code == 0, table.output
    rows = dict(line.split("  ", 1) for line in table.output.strip().splitlines())
    assert {k.strip() for k in rows} == {"prompt / new tokens", "prefill", "time to first token", "decode", "speculation", "peak resident memory"}
    assert rows["peak resident memory"].strip().endswith(f", {expected})")


@pytest.mark.parametrize("kind", KINDS)
def test_lmrt_info_says_what_a_sequence_state_takes(kind, request):
    gen = generator_of(request, kind)
    out = CliRunner().invoke(main, ["info", gen.model_dir]).output
    if kind == "word_gpt":
        assert "no state: each step runs the sequence again" in out
    elif kind == "kv_gpt":
        assert f"per sequence: {size(4 * HEADS * HEAD_SIZE * 4)} per token;" in out
    else:
        assert f"per sequence: {size(fixed_bytes_of(gen))} per sequence (and up to {PER_ROW} snapshots of it); carried step by step, going back from snapshots" in out


# --- int4 ------------------------------------------------------------------------------------------


def test_int4_passes_its_gate(char_gru, tmp_path):
    module, vocab, _ = char_gru
    manifest, gen = quantized_export(module, vocab, CHARS, "int4", tmp_path)
    assert manifest.quantization["bits"] == 4 and manifest.quantization["quantized"]["linear"] >= 1
    ids = gen.encode(CHARS[:300])
    assert gen.score(ids).perplexity == pytest.approx(manifest.quality["perplexity"], rel=0.5)
    assert gen.generate_batch([ids[:5]], max_new_tokens=8, stop_token_ids=[], speculation="on")[0][0].token_ids == (
        gen.generate_batch([ids[:5]], max_new_tokens=8, stop_token_ids=[], speculation="off")[0][0].token_ids
    )


# --- chat ------------------------------------------------------------------------------------------

TEMPLATE = "{% for m in messages %}{{ m['content'] }} . {% endfor %}{% if add_generation_prompt %}the{% endif %}"


def test_a_chat_template_comes_with_a_transformers_tokenizer(word_lstm, tmp_path):
    transformers = pytest.importorskip("transformers")
    module, _, plain = word_lstm
    with pytest.raises(ChatTemplateError, match="this model has no chat template"):
        plain.chat([{"role": "user", "content": "the cat"}])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=f"{plain.model_dir}/tokenizer.json", chat_template=TEMPLATE)
    export_model(module, str(tmp_path / "chat"), tokenizer=tokenizer, progress=lambda line: None)
    gen = Generator(str(tmp_path / "chat"), provider="cpu")
    messages = [{"role": "user", "content": "the cat sat on the mat"}, {"role": "assistant", "content": "a dog ran"}, {"role": "user", "content": "the bird"}]
    ids = gen.chat_prompt(messages)
    assert ids == gen.encode("the cat sat on the mat . a dog ran . the bird . the")
    expected = torch_greedy(module, ids, 8)
    assert gen.chat(messages, max_new_tokens=8, stop_token_ids=[]) == gen.decode(expected)


# --- structured output -----------------------------------------------------------------------------

ANIMALS = {"cat": 4, "dog": 4, "bird": 2, "fish": 0, "ant": 6}
JSON_LINES = "".join(json.dumps({"animal": a, "legs": n}) + "\n" for a, n in ANIMALS.items()) * 12
SCHEMA = {
    "type": "object",
    "properties": {"animal": {"enum": sorted(ANIMALS)}, "legs": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["animal", "legs"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def json_lstm(tmp_path_factory):
    pytest.importorskip("llguidance")
    vocab = sorted(set(JSON_LINES))
    torch.manual_seed(0)
    module = LstmLM(len(vocab))
    train(module, [vocab.index(c) for c in JSON_LINES], steps=120)
    module.eval()
    out = tmp_path_factory.mktemp("own") / "json"
    export_model(module, str(out), tokenizer=vocab, progress=lambda line: None)
    return module, Generator(str(out), provider="cpu")


def test_a_json_schema_constrains_a_recurrent_model(json_lstm):
    """The output (after any prompt) parses and fits the schema; each token's log-probability is the module's own
    given the prompt and the tokens before it (the state carried through masked steps), and a batch
    of prompts gives each one's answer alone."""
    module, gen = json_lstm
    prompts = ['{"animal": "', '{"', "\n{"]
    options = dict(max_new_tokens=40, stop_token_ids=[], json_schema=SCHEMA)
    alone = []
    for prompt in prompts:
        completion = gen.generate_batch([prompt], logprobs=0, **options)[0][0]
        value = json.loads(completion.text)  # the output alone is the JSON value, whatever the prompt
        assert set(value) == {"animal", "legs"} and value["animal"] in ANIMALS and 0 <= value["legs"] <= 9
        ids = gen.encode(prompt)
        expected = [float(torch.log_softmax(next_logits(module, ids + completion.token_ids[:i]), -1)[t]) for i, t in enumerate(completion.token_ids)]
        assert [lp.logprob for lp in completion.logprobs] == pytest.approx(expected, abs=1e-4)
        alone.append(completion.token_ids)
    assert [r[0].token_ids for r in gen.generate_batch(prompts, **options)] == alone


def test_a_word_level_vocabulary_refuses_a_schema_in_one_line(word_lstm):
    """Words decoded with spaces between them are not text llguidance can spell token by token."""
    from lmrt.runtime import ConfigError

    _, _, gen = word_lstm
    with pytest.raises(ConfigError, match="json_schema needs a tokenizer llguidance can read") as e:
        gen.generate("the cat", max_new_tokens=4, json_schema=SCHEMA)
    assert "\n" not in str(e.value)
