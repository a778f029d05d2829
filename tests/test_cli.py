"""The command line: same results as the Python API, one-line errors, examples in --help."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from lmrt import runtime
from lmrt.cli import main


@pytest.fixture
def run():
    runner = CliRunner()

    def invoke(*args, input=None):
        return runner.invoke(main, list(args), input=input)

    return invoke


def test_generate_streams_the_same_text_as_the_api(run, tiny_models):
    path = tiny_models["llama"][2]
    expected = runtime.Generator(path).generate(
        "The capital of", max_new_tokens=16, temperature=0.8, top_k=40, seed=4, stop_token_ids=[]
    )
    result = run("generate", path, "The capital of", "-n", "16", "-t", "0.8", "--top-k", "40", "--seed", "4", "--stop-token-id", "999")
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"


def test_generate_reads_stdin_and_reports_stats(run, tiny_models):
    path = tiny_models["gpt2"][2]
    expected = runtime.Generator(path).generate("Small models", max_new_tokens=5, stop_token_ids=[])
    result = run("generate", path, "-", "-n", "5", "--stats", "--stop-token-id", "999", input="Small models")
    assert result.exit_code == 0
    assert result.stdout == expected + "\n"
    assert "5 tokens, finish: length" in result.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "{m}", "hi", "--temperature", "-1"], "error: temperature must be"),
        (["generate", "{m}", "hi", "--top-p", "2"], "error: top_p must be"),
        (["generate", "{m}", "hi", "--provider", "npu"], "error: unknown provider 'npu'"),
        (["generate", "/no/such/model", "hi"], "error: model directory not found"),
        (["generate", "{m}", "hi", "--chat"], "error: this model has no chat template"),
        (["generate", "{m}", "hi", "--threads", "0"], "error: threads must be a positive integer"),
        (["info", "/no/such/model"], "error: model directory not found"),
        (["export", "/no/such/file.gguf", "-o", "/tmp/lmrt-never"], "error: GGUF file not found"),
        (["export", "{m}", "-o", "{m}"], "already exists; pass --force"),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(run, tiny_models, args, message):
    path = tiny_models["gpt2"][2]
    result = run(*[a.replace("{m}", path) for a in args])
    assert result.exit_code == 1
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1


def test_prompt_too_long(run, tiny_models):
    result = run("generate", tiny_models["gpt2"][2], "word " * 400)
    assert result.exit_code == 1 and "context is 128" in result.stderr


def test_info_summarizes_the_manifest(run, tiny_models):
    result = run("info", tiny_models["llama"][2])
    assert result.exit_code == 0
    assert "4 heads, 2 KV heads, head size 16" in result.stdout
    assert "passed" in result.stdout
    assert "providers" in result.stdout and "cpu" in result.stdout


@pytest.mark.parametrize("command", ["export", "generate", "info"])
def test_help_shows_an_example(run, command):
    result = run(command, "--help")
    assert result.exit_code == 0
    assert f"lmrt {command} " in result.stdout and "Example" in result.stdout
