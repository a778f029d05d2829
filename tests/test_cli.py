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
    gen = runtime.Generator(path)
    last = gen.manifest.architecture.vocab_size - 1  # a stop id instead of the model's eos
    expected = gen.generate("The capital of", max_new_tokens=16, temperature=0.8, top_k=40, seed=4, stop_token_ids=[last])
    result = run("generate", path, "The capital of", "-n", "16", "-t", "0.8", "--top-k", "40", "--seed", "4", "--stop-token-id", str(last))
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"


def test_generate_reads_stdin_and_reports_stats(run, tiny_models):
    path = tiny_models["gpt2"][2]
    gen = runtime.Generator(path)
    last = gen.manifest.architecture.vocab_size - 1
    expected = gen.generate("Small models", max_new_tokens=5, stop_token_ids=[last])
    result = run("generate", path, "-", "-n", "5", "--stats", "--stop-token-id", str(last), input="Small models")
    assert result.exit_code == 0
    assert result.stdout == expected + "\n"
    assert "5 tokens, finish: length" in result.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "{m}", "hi", "--temperature", "-1"], "error: --temperature must be"),
        (["generate", "{m}", "hi", "--top-p", "2"], "error: --top-p must be"),
        (["generate", "{m}", "hi", "--provider", "npu"], "error: unknown provider 'npu'"),
        (["generate", "/no/such/model", "hi"], "error: model directory not found"),
        (["generate", "{m}", "hi", "--chat"], "error: this model has no chat template"),
        (["generate", "{m}", "hi", "--threads", "0"], "error: --threads must be a positive integer"),
        (["info", "/no/such/model"], "error: model directory not found"),
        (["export", "/no/such/file.gguf", "-o", "/tmp/lmrt-never"], "error: GGUF file not found"),
        (["export", "{m}", "-o", "{m}"], "already exists; pass --force"),
        # every numeric flag out of its range names the range
        (["serve", "{m}", "--port", "99999"], "error: --port must be from 0 to 65535 (0: any free port), got 99999"),
        (["serve", "{m}", "--port", "-1"], "error: --port must be from 0 to 65535"),
        (["serve", "{m}", "--body-timeout", "0"], "error: --body-timeout must be a number of seconds above 0"),
        (["serve", "{m}", "--body-timeout", "inf"], "error: --body-timeout must be a number of seconds above 0"),
        (["serve", "{m}", "--slots", "0"], "error: --slots must be at least 1, got 0"),
        (["serve", "{m}", "--max-queue", "-1"], "error: --max-queue must be at least 0, got -1"),
        (["serve", "{m}", "--prefill-chunk", "0"], "error: --prefill-chunk must be at least 1, got 0"),
        (["serve", "{m}", "--ctx-size", "1"], "error: --ctx-size must be from 2 to the model's context (128), got 1"),
        (["serve", "{m}", "--threads", "0"], "error: --threads must be a positive integer"),
        (["generate", "{m}", "hi", "--max-new-tokens", "0"], "error: --max-new-tokens must be a positive integer, got 0"),
        (["generate", "{m}", "hi", "--min-new-tokens", "-1"], "error: --min-new-tokens must be an integer from 0 to max_new_tokens"),
        (["generate", "{m}", "hi", "--temperature", "nan"], "error: --temperature must be a finite number >= 0"),
        (["generate", "{m}", "hi", "--top-k", "-1"], "error: --top-k must be an integer >= 0"),
        (["generate", "{m}", "hi", "--min-p", "2"], "error: --min-p must be a number in [0, 1]"),
        (["generate", "{m}", "hi", "--repetition-penalty", "0"], "error: --repetition-penalty must be a finite number > 0"),
        (["generate", "{m}", "hi", "--presence-penalty", "3"], "error: --presence-penalty must be a number from -2 to 2"),
        (["generate", "{m}", "hi", "--frequency-penalty", "inf"], "error: --frequency-penalty must be a number from -2 to 2"),
        (["generate", "{m}", "hi", "--no-repeat-ngram-size", "-1"], "error: --no-repeat-ngram-size must be an integer >= 0"),
        (["generate", "{m}", "hi", "--num-beams", "0"], "error: --num-beams must be a positive integer"),
        (["generate", "{m}", "hi", "--length-penalty", "nan"], "error: --length-penalty must be a finite number"),
        (["generate", "{m}", "hi", "--num-return-sequences", "0"], "error: --num-return-sequences must be a positive integer"),
        (["generate", "{m}", "hi", "--seed", "-1"], "error: --seed must be a non-negative integer below 2**63"),
        (["generate", "{m}", "hi", "--stop-token-id", "-1"], "error: --stop-token-id must be a list of non-negative integers"),
        (["eval", "{m}", "--max-tokens", "1"], "error: --max-tokens must be a whole number, at least 2, got 1"),
        (["eval", "{m}", "--stride", "0"], "error: --stride must be a whole number, at least 1, got 0"),
        (["eval", "{m}", "--window", "1"], "error: --window must be a whole number of tokens, at least 2"),
        (["bench", "{m}", "--new-tokens", "1"], "error: --prompt-tokens must be at least 1, --new-tokens at least 2 and --runs at least 1"),
        (["embed", "{m}", "hi", "--batch-size", "0"], "error: --batch-size must be a whole number, at least 1, got 0"),
        (["classify", "{m}", "hi", "--batch-size", "-2"], "error: --batch-size must be a whole number, at least 1, got -2"),
        (["classify", "{m}", "hi", "-k", "0"], "error: -k/--top-k must be a whole number, at least 1, got 0"),
        (["export", "{m}", "-o", "/tmp/lmrt-never", "--tolerance", "0"], "error: --tolerance must be a finite number above 0"),
        (["quantize", "{m}", "-o", "/tmp/lmrt-never", "--int8", "--max-ppl-increase", "-1"], "error: --max-ppl-increase must be a finite number of percent, 0 or more"),
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


def test_beams_and_several_sequences_print_like_the_api(run, tiny_models):
    path = tiny_models["llama"][2]
    gen = runtime.Generator(path)
    expected = gen.generate_batch(["The capital of", "Small"], max_new_tokens=8, num_beams=3, num_return_sequences=2)
    result = run("generate", path, "The capital of", "Small", "-n", "8", "-b", "3", "-N", "2", "--early-stopping", "false")
    assert result.exit_code == 0, result.output
    blocks = [f"[prompt {p}, sequence {s}]\n{c.text}\n" for p, cs in enumerate(expected, 1) for s, c in enumerate(cs, 1)]
    assert result.stdout == "".join(blocks)


def test_json_output_has_one_object_per_sequence(run, tiny_models):
    import json

    path = tiny_models["gpt2"][2]
    expected = runtime.Generator(path).generate_batch(
        ["Once", "北京"], max_new_tokens=6, temperature=0.9, min_p=0.05, num_return_sequences=2, seed=1
    )
    result = run("generate", path, "Once", "北京", "-n", "6", "-t", "0.9", "--min-p", "0.05", "-N", "2", "--seed", "1", "--json")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["prompt"], r["sequence"], r["text"]) for r in records] == [
        (p, s, c.text) for p, cs in enumerate(expected, 1) for s, c in enumerate(cs, 1)
    ]


def test_terminal_chat_keeps_the_history_and_resets(run, chat_model):
    gen = runtime.Generator(chat_model)
    last = gen.manifest.architecture.vocab_size - 1
    options = dict(max_new_tokens=6, stop_token_ids=[last])
    system = [{"role": "system", "content": "Be brief."}]
    first = gen.chat(system + [{"role": "user", "content": "hello"}], **options)
    history = system + [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first}]
    second = gen.chat(history + [{"role": "user", "content": "and then"}], **options)
    fresh = gen.chat(system + [{"role": "user", "content": "and then"}], **options)
    assert second != fresh  # the answer depends on the first turn

    result = run("chat", chat_model, "--system", "Be brief.", "-n", "6", "--stop-token-id", str(last),
                 input="hello\nand then\n/reset\n\nand then\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"> {first}\n> {second}\n> > > {fresh}\n> \n"
    assert "[conversation cleared]" in result.stderr


def test_terminal_chat_drops_old_turns_to_fit_the_context(run, chat_model):
    long = "The capital of France is Paris. " * 6  # about 40 tokens of a 128-token context
    result = run("chat", chat_model, "-n", "20", input=f"{long}\n{long}\n{long}\n")
    assert result.exit_code == 0, result.output
    assert "oldest exchange was dropped" in result.stderr
    too_long = "Paris " * 200
    result = run("chat", chat_model, input=f"{too_long}\n")
    assert result.exit_code == 0 and "too long for the model's context" in result.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["chat", "{m}"], "error: this model has no chat template"),
        (["chat", "{m}", "--num-beams", "0"], "error: --num-beams must be"),
        (["chat", "{m}", "-N", "2", "-t", "1"], "error: chat answers with one sequence"),
        (["generate", "{m}", "hi", "-b", "2", "-t", "0.5"], "error: --temperature must be 0 with beam search"),
        (["generate", "{m}", "hi", "--early-stopping", "maybe"], "Invalid value for '--early-stopping'"),
        (["generate", "{m}"], "Missing argument 'PROMPT...'"),
    ],
)
def test_chat_and_decoding_errors(run, tiny_models, args, message):
    path = tiny_models["gpt2"][2]
    result = run(*[a.replace("{m}", path) for a in args])
    assert result.exit_code != 0
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_bench_reports_medians_as_json(run, tiny_models):
    import json

    path = tiny_models["llama"][2]
    result = run("bench", path, "--prompt-tokens", "40", "--new-tokens", "16", "--runs", "2", "--threads", "1", "--json")
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert (r["prompt_tokens"], r["new_tokens"], r["runs"], r["threads"], r["provider"]) == (40, 16, 2, 1, "cpu")
    for key in ("prefill_tokens_per_s", "time_to_first_token_ms", "decode_tokens_per_s", "peak_rss_mb", "model_files_mb"):
        assert r[key] > 0, key
    a = runtime.load_manifest(path).architecture  # 2 layers x (K, V) x kv heads x head size x 56 positions x fp32
    assert r["kv_cache_mb"] == pytest.approx(2 * a.num_layers * a.num_kv_heads * a.head_size * 56 * 4 / 1e6)
    assert r["prefill_tokens_per_s"] == pytest.approx(40 / (r["time_to_first_token_ms"] / 1e3))
    assert 0 < r["python_share"] < 1  # the share of a decode step spent outside onnxruntime
    table = run("bench", path, "--prompt-tokens", "8", "--new-tokens", "4", "--runs", "1")
    assert table.exit_code == 0 and "time to first token" in table.stdout and "decode" in table.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--prompt-tokens", "120", "--new-tokens", "9"], "more than the model's context (128)"),
        (["--new-tokens", "1"], "--new-tokens at least 2"),
        (["--runs", "0"], "--runs at least 1"),
    ],
)
def test_bench_rejects_bad_sizes(run, tiny_models, args, message):
    result = run("bench", tiny_models["llama"][2], *args)
    assert result.exit_code == 1 and message in result.stderr and "Traceback" not in result.output
