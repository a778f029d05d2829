"""The ``lmrt`` command line. Heavy imports (torch, transformers) happen only inside ``export``."""

from __future__ import annotations

import functools
import sys
import time

import click

from . import __version__


class _Fail(click.ClickException):
    """A one-line error on stderr and exit status 1."""

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _errors_to_one_line(fn):
    """Turn the errors users cause (bad paths, options, models) into one line instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .export.errors import ExportError
        from .quantize.errors import QuantizeError

        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("", err=True)
            sys.exit(130)
        except (ExportError, QuantizeError, ValueError, ImportError, OSError) as e:  # ManifestError etc. are ValueErrors
            raise _Fail(str(e).splitlines()[0] if str(e) else type(e).__name__) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lmrt")
def main() -> None:
    """lmrt: export language models to ONNX and run them without PyTorch."""


def _quality_gate_options(fn):
    """The quantization gate's options, shared by export and quantize."""
    options = [
        click.option(
            "--max-ppl-increase",
            type=float,
            help="Largest perplexity increase over fp32 allowed, in percent (default: int8 2, int4 15).",
        ),
        click.option("--allow-degraded", is_flag=True, help="Keep a quantized model even if it fails the gate."),
        click.option(
            "--eval-text",
            type=click.Path(dir_okay=False),
            help="UTF-8 text the gate measures perplexity on (default: Python's reference manual).",
        ),
        click.option(
            "--compute",
            type=click.Choice(["int8", "float"]),
            help="int8: fast integer kernels on CPU (default); float: exact, slower.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _gate_kwargs(max_ppl_increase, allow_degraded, eval_text) -> dict:
    out = {"allow_degraded": allow_degraded, "eval_text": eval_text}
    if max_ppl_increase is not None:
        out["max_increase"] = max_ppl_increase / 100.0
    return out


@main.command()
@click.argument("source")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Model directory to write.")
@click.option("--fp16", "precision", flag_value="fp16", help="float16 weights and compute (for GPU providers).")
@click.option("--int8", "precision", flag_value="int8", help="8-bit block-quantized weights.")
@click.option("--int4", "precision", flag_value="int4", help="4-bit block-quantized weights (8-bit embeddings).")
@_quality_gate_options
@click.option(
    "--task",
    type=click.Choice(["generate", "embed", "classify"]),
    help="generate (decoders), embed or classify (encoders) [default: detected from the model].",
)
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option(
    "--tolerance",
    type=float,
    help="Largest logit difference from PyTorch allowed, relative to the largest logit [default: 1e-3; fp16 2e-2].",
)
@_errors_to_one_line
def export(source, output, precision, task, force, tolerance, max_ppl_increase, allow_degraded, eval_text, compute) -> None:
    """Export SOURCE to an ONNX model directory, validated against PyTorch.

    SOURCE is a Hugging Face Hub id, a local Hugging Face model directory, or a .gguf file.
    With --int8 / --int4 the validated fp32 graph is quantized and must pass the quality gate:
    perplexity on an evaluation text may not rise more than --max-ppl-increase over fp32. From a
    Q4_0 / Q4_1 / Q8_0 GGUF file, the file's own blocks are kept where they fit. BERT-family
    encoders are exported for `lmrt embed` (a sentence-transformers model) or `lmrt classify` (a
    *ForSequenceClassification model); --int8 gates them on cosine similarity / label agreement.

    \b
    Examples:
      lmrt export SmolLM2-135M-Instruct.Q4_1.gguf -o models/smollm2 --int4
      lmrt export ./my-finetuned-llama -o models/mine --int8 --force
      lmrt export gpt2 -o models/gpt2
      lmrt export ./all-MiniLM-L6-v2 -o models/minilm --int8
    """
    try:
        from .export import export_model
    except ImportError as e:
        raise _Fail(f"export needs the export extra: pip install 'lmrt[export]' ({e})") from None
    precision = precision or "fp32"
    options = {}
    if precision in ("int8", "int4"):
        options = _gate_kwargs(max_ppl_increase, allow_degraded, eval_text)
        if compute:
            options["compute"] = compute
    elif max_ppl_increase is not None or allow_degraded or eval_text or compute:
        raise _Fail("--max-ppl-increase, --allow-degraded, --eval-text and --compute apply to --int8 / --int4 only")
    export_model(source, output, force=force, tolerance=tolerance, precision=precision, task=task, **options)


@main.command()
@click.argument("model_dir", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Model directory to write.")
@click.option("--int8", "scheme", flag_value="int8", help="8-bit block-quantized weights.")
@click.option("--int4", "scheme", flag_value="int4", help="4-bit block-quantized weights (8-bit embeddings).")
@click.option("--gguf", type=click.Path(dir_okay=False), help="Take Q4_0/Q4_1/Q8_0 blocks from this GGUF file where they fit.")
@click.option("--no-gguf-blocks", is_flag=True, help="Quantize from the float weights even if the source was a GGUF file.")
@_quality_gate_options
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@_errors_to_one_line
def quantize(model_dir, output, scheme, gguf, no_gguf_blocks, max_ppl_increase, allow_degraded, eval_text, compute, force):
    """Quantize the fp32 model in MODEL_DIR (written by `lmrt export`) into OUTPUT.

    The result must pass the quality gate (see `lmrt export --help`). When MODEL_DIR was exported
    from a GGUF file that is still in place, its blocks are kept where they fit.

    \b
    Examples:
      lmrt quantize models/smollm2 -o models/smollm2-int8 --int8
      lmrt quantize models/smollm2 -o models/smollm2-int4 --int4 --max-ppl-increase 5
    """
    import dataclasses

    from .quantize import quantize_directory, scheme_for

    if not scheme:
        raise _Fail("choose --int8 or --int4")
    if gguf and no_gguf_blocks:
        raise _Fail("--gguf and --no-gguf-blocks contradict each other")
    chosen = scheme_for(scheme)
    if compute:
        chosen = dataclasses.replace(chosen, compute=compute)
    source = None if no_gguf_blocks else (gguf or "auto")
    quantize_directory(
        model_dir, output, chosen, gguf=source, force=force, **_gate_kwargs(max_ppl_increase, allow_degraded, eval_text)
    )


@main.command("eval")
@click.argument("model_dir", type=click.Path())
@click.option("--text", "text_file", type=click.Path(dir_okay=False), help="UTF-8 text file (default: Python's reference manual).")
@click.option("--max-tokens", type=int, help="Score only the first N tokens.")
@click.option("--window", type=int, help="Tokens per window (default: the model's context).")
@click.option("--stride", type=int, help="Tokens between window starts (default: half a window).")
@click.option("--provider", default="auto", show_default=True, help="auto, tensorrt, cuda or cpu.")
@click.option("--threads", type=int, help="CPU threads.")
@_errors_to_one_line
def eval_(model_dir, text_file, max_tokens, window, stride, provider, threads) -> None:
    """Print the perplexity of the model in MODEL_DIR on a text.

    \b
    Examples:
      lmrt eval models/smollm2-int4 --text article.txt
      lmrt eval models/smollm2 --max-tokens 2048
    """
    from .runtime import Generator

    if max_tokens is not None and max_tokens < 2:
        raise _Fail("--max-tokens must be at least 2")
    if text_file:
        try:
            with open(text_file, encoding="utf-8") as f:
                text, name = f.read(), text_file
        except UnicodeDecodeError as e:
            raise _Fail(f"{text_file} is not UTF-8 text ({e.reason})") from None
    else:
        from .quantize.evaltext import reference_text

        text, name = reference_text(), "Python reference manual"
    gen = Generator(model_dir, provider=provider, threads=threads)
    ids = gen.encode(text)[:max_tokens]
    start = time.perf_counter()
    score = gen.score(ids, window=window, stride=stride)
    elapsed = time.perf_counter() - start
    click.echo(f"perplexity {score.perplexity:.4f}")
    click.echo(
        f"[{name}: {len(ids)} tokens, {score.num_scored} scored, {score.mean_nll:.4f} nats/token, "
        f"{score.num_scored / elapsed:.0f} tokens/s, provider {gen.provider}]",
        err=True,
    )


def _generation_options(fn):
    """One CLI option per GenerationConfig field; unset options keep the model's defaults."""
    options = [
        click.option("-n", "--max-new-tokens", type=int, help="Tokens to generate at most."),
        click.option("--min-new-tokens", type=int, help="Ban the stop tokens until this many are generated."),
        click.option("-t", "--temperature", type=float, help="0 is greedy decoding (the default)."),
        click.option("--top-k", type=int, help="Sample among the k most likely tokens (0: off)."),
        click.option("--top-p", type=float, help="Nucleus sampling threshold in (0, 1]."),
        click.option("--min-p", type=float, help="Sample among tokens at least this fraction as likely as the top one."),
        click.option("--repetition-penalty", type=float, help="Above 1 discourages repeats."),
        click.option("--no-repeat-ngram-size", type=int, help="Never repeat an n-gram of this size."),
        click.option("-b", "--num-beams", type=int, help="Beam search with this many beams."),
        click.option("--length-penalty", type=float, help="Beam search: score = log-prob / length ** this."),
        click.option(
            "--early-stopping",
            type=click.Choice(["true", "false", "never"]),
            callback=lambda ctx, param, v: None if v is None else {"true": True, "false": False}.get(v, v),
            help="Beam search: stop once enough beams finish (true), when none is likely to improve (false), or never.",
        ),
        click.option("-N", "--num-return-sequences", type=int, help="Sequences per prompt (samples or best beams)."),
        click.option("--seed", type=int, help="Seed for reproducible sampling."),
        click.option("--stop", multiple=True, help="Stop before this string (repeatable)."),
        click.option("--stop-token-id", "stop_token_ids", type=int, multiple=True, help="Stop at this token id (repeatable; default: the model's end-of-sequence ids)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _runtime_options(fn):
    for option in reversed(
        [
            click.option("--provider", default="auto", show_default=True, help="auto, tensorrt, cuda or cpu."),
            click.option("--threads", type=int, help="CPU threads (default: onnxruntime's choice, the physical cores)."),
        ]
    ):
        fn = option(fn)
    return fn


@main.command()
@click.argument("model_dir", type=click.Path())
@click.argument("prompts", metavar="PROMPT...", nargs=-1, required=True)
@_generation_options
@click.option("--chat", is_flag=True, help="Send each PROMPT as a user message through the model's chat template.")
@click.option("--system", help="System message for --chat.")
@_runtime_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per sequence instead of text.")
@click.option("--stats", is_flag=True, help="Print tokens, finish reason and speed to stderr.")
@_errors_to_one_line
def generate(model_dir, prompts, chat, system, provider, threads, as_json, stats, stop, stop_token_ids, **options) -> None:
    """Generate completions of PROMPT with the model in MODEL_DIR.

    One prompt and one sequence stream to stdout. Several prompts run as one batch, and several
    sequences (-N) come from sampling or beam search; each is printed under a "[prompt P,
    sequence S]" line. PROMPT "-" reads the prompt from stdin.

    \b
    Examples:
      lmrt generate models/smollm2 "The capital of France is" -n 32
      lmrt generate models/smollm2 "What is the capital of France?" --chat
      lmrt generate models/smollm2 "Once upon a time" -t 0.8 --min-p 0.05 -N 3 --seed 1
      lmrt generate models/smollm2 "The best way to learn is" -b 4 --no-repeat-ngram-size 3
      lmrt generate models/smollm2 "Paris is" "Rome is" "Tokyo is" -n 16 --json
      echo "Once upon a time" | lmrt generate models/smollm2 - -t 0.8 --top-p 0.9 --seed 1
    """
    import json

    from .runtime import Generator

    prompts = [sys.stdin.read() if p == "-" else p for p in prompts]
    options["stop"] = stop or None
    options["stop_token_ids"] = stop_token_ids or None
    gen = Generator(model_dir, provider=provider, threads=threads)
    config = gen.config(**options)  # reject bad options before rendering or encoding the prompt
    if chat:
        system_message = [{"role": "system", "content": system}] if system else []
        prompts = [gen.chat_prompt(system_message + [{"role": "user", "content": p}]) for p in prompts]
    start = time.perf_counter()
    if len(prompts) == 1 and config.num_return_sequences == 1 and not as_json:
        stream = gen.stream(prompts[0], **options)
        for piece in stream:
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()
        results = [[stream]]
    else:
        results = gen.generate_batch(prompts, **options)
        for p, completions in enumerate(results, 1):
            for s, c in enumerate(completions, 1):
                if as_json:
                    record = {"prompt": p, "sequence": s, "text": c.text, "finish_reason": c.finish_reason,
                              "tokens": len(c.token_ids), "score": c.score}
                    click.echo(json.dumps(record, ensure_ascii=False))
                else:
                    click.echo(f"[prompt {p}, sequence {s}]\n{c.text}")
    if stats:
        elapsed = time.perf_counter() - start
        n = sum(len(c.token_ids) for completions in results for c in completions)
        reasons = ", ".join(sorted({c.finish_reason for completions in results for c in completions}))
        click.echo(
            f"[{n} tokens, finish: {reasons}, {n / elapsed:.1f} tokens/s overall, provider {gen.provider}]",
            err=True,
        )


@main.command("chat")
@click.argument("model_dir", type=click.Path())
@_generation_options
@click.option("--system", help="System message, kept for the whole conversation.")
@_runtime_options
@_errors_to_one_line
def chat_(model_dir, system, provider, threads, stop, stop_token_ids, **options) -> None:
    """Chat with the model in MODEL_DIR in the terminal.

    Type a message and press Enter; the answer streams back and the conversation carries on.
    /reset clears the conversation, Ctrl-C stops an answer, Ctrl-D leaves. When the
    conversation outgrows the context, its oldest exchanges are dropped.

    \b
    Examples:
      lmrt chat models/smollm2
      lmrt chat models/smollm2 --system "Answer in one short sentence." -t 0.7 --seed 1
    """
    from . import terminal_chat
    from .runtime import Generator

    options["stop"] = stop or None
    options["stop_token_ids"] = stop_token_ids or None
    terminal_chat.run(Generator(model_dir, provider=provider, threads=threads), system, options)


@main.command()
@click.argument("model_dir", type=click.Path())
@click.option("--prompt-tokens", type=int, default=128, show_default=True, help="Prompt length.")
@click.option("--new-tokens", type=int, default=128, show_default=True, help="Tokens to generate (greedy, stop tokens ignored).")
@click.option("--runs", type=int, default=3, show_default=True, help="Measured runs, after one warm-up run.")
@_runtime_options
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
@_errors_to_one_line
def bench(model_dir, prompt_tokens, new_tokens, runs, provider, threads, as_json) -> None:
    """Measure prefill speed, time to first token, decode speed and peak memory of MODEL_DIR.

    Medians over --runs runs of greedy decoding through lmrt's own decode loop. Peak memory is the
    process's peak resident size, model loading included.

    \b
    Examples:
      lmrt bench models/smollm2-int8
      lmrt bench models/smollm2-int4 --prompt-tokens 512 --new-tokens 64 --runs 5 --json
    """
    import dataclasses
    import json

    from . import bench as benchmark

    result = benchmark.run(model_dir, prompt_tokens, new_tokens, runs, provider, threads)
    click.echo(json.dumps(dataclasses.asdict(result)) if as_json else benchmark.as_table(result))


@main.command()
@click.argument("model_dir", type=click.Path())
@_errors_to_one_line
def info(model_dir: str) -> None:
    """Summarize the model in MODEL_DIR and list the execution providers available here.

    \b
    Example:
      lmrt info models/smollm2
    """
    from .atomic import directory_size
    from .runtime import load_manifest
    from .runtime.session import available_providers

    m = load_manifest(model_dir)
    if m.task != "generate":
        from .encoder_output import encoder_rows

        _print_rows(encoder_rows(m, directory_size(model_dir)) + [("providers", ", ".join(available_providers()) or "none")])
        return
    a, t, p, v = m.architecture, m.tokenizer, m.provenance, m.validation
    size = directory_size(model_dir)
    rows = [
        ("model", f"{a.model_type} ({a.family} family), {a.num_layers} layers, hidden {a.hidden_size}"),
        ("attention", f"{a.num_heads} heads, {a.num_kv_heads} KV heads, head size {a.head_size}"),
        ("vocabulary", str(a.vocab_size)),
        ("context", f"{a.context_length} tokens"),
        ("weights", f"{m.graph.dtype}, {size / 1e6:.1f} MB on disk"),
        ("eos ids", ", ".join(map(str, t.eos_token_ids)) or "none"),
        ("chat template", "yes" if t.chat_template else "no"),
        ("defaults", ", ".join(f"{k}={val}" for k, val in m.generation_defaults.items()) or "none"),
        ("source", f"{p.get('source', '?')} ({p.get('source_kind', '?')}), lmrt {p.get('lmrt_version', '?')}"),
    ]
    if v:
        rows.append(
            (
                "validation",
                f"max |Δlogit| {v['max_abs_diff']:.2e} (relative {v['max_rel_diff']:.2e}), "
                f"greedy agreement {v['greedy_agreement']:.1%}, {'passed' if v.get('passed') else 'FAILED'}",
            )
        )
    q, g = m.quantization, m.quality
    if q:
        kept = ", ".join(f"{n} {k}" for k, n in q.get("gguf_blocks_kept", {}).items())
        rows.append(
            (
                "quantization",
                f"{q['name']}: {q['bits']}-bit {q['method']} blocks of {q['block_size']}, lm_head/embeddings "
                f"{q['head_bits']}-bit, compute {q.get('compute', 'int8')}" + (f"; kept from GGUF: {kept}" if kept else ""),
            )
        )
    if g:
        rows.append(
            (
                "quality",
                f"perplexity {g['perplexity']:.3f} vs fp32 {g['perplexity_reference']:.3f} ({g['increase']:+.2%}, "
                f"allowed +{g['max_increase']:.0%}), top-1 agreement {g['top1_agreement']:.1%}"
                + (" (kept with --allow-degraded)" if g.get("allowed_degraded") else ""),
            )
        )
    rows.append(("providers", ", ".join(available_providers()) or "none"))
    _print_rows(rows)


def _print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


def _encoder_options(fn):
    """Options shared by embed and classify."""
    for option in reversed(
        [
            click.option("--batch-size", type=int, default=32, show_default=True,
                         help="Texts per run; texts are sorted by length, so each batch is padded only to its longest."),
            click.option("--no-truncate", is_flag=True,
                         help="Refuse a text longer than the model's maximum length instead of cutting it."),
            click.option("--json", "as_json", is_flag=True, help="Print one JSON object per text."),
        ]
    ):  # fmt: skip
        fn = option(fn)
    return _runtime_options(fn)


@main.command()
@click.argument("model_dir", type=click.Path())
@click.argument("texts", metavar="TEXT...", nargs=-1, required=True)
@_encoder_options
@_errors_to_one_line
def embed(model_dir, texts, batch_size, no_truncate, as_json, provider, threads) -> None:
    """Print the sentence embedding of each TEXT, computed by the embedding model in MODEL_DIR.

    One line per text, in order: the numbers separated by spaces, or with --json an object with
    "index" and "embedding". TEXT "-" reads one text per line from stdin. Pooling and
    normalization are the model's own (see `lmrt info`). Export a sentence-transformers model with
    `lmrt export DIR -o OUT` (the task is detected) or `--task embed`.

    \b
    Examples:
      lmrt embed models/minilm "A cat sits on the mat." "Ein Hund spielt im Garten."
      lmrt embed models/minilm - --json < sentences.txt
    """
    from .encoder_output import embedding_line, read_texts
    from .runtime import Encoder

    encoder = Encoder(model_dir, provider=provider, threads=threads, truncate=not no_truncate)
    vectors = encoder.embed(read_texts(texts, sys.stdin), batch_size=batch_size)
    for i, vector in enumerate(vectors):
        click.echo(embedding_line(i, vector, as_json))


@main.command()
@click.argument("model_dir", type=click.Path())
@click.argument("texts", metavar="TEXT...", nargs=-1, required=True)
@click.option("-k", "--top-k", type=int, default=1, show_default=True, help="Labels per text, best first.")
@_encoder_options
@_errors_to_one_line
def classify(model_dir, texts, top_k, batch_size, no_truncate, as_json, provider, threads) -> None:
    """Print the labels of each TEXT, given by the classification model in MODEL_DIR.

    One line per text, in order: label and score pairs separated by tabs, best first, or with
    --json an object with "index" and "labels". Scores are the softmax of the logits (the sigmoid
    for a multi-label model). TEXT "-" reads one text per line from stdin. Export a
    *ForSequenceClassification model with `lmrt export DIR -o OUT` (the task is detected).

    \b
    Examples:
      lmrt classify models/sentiment "What a lovely day." "This is terrible."
      lmrt classify models/sentiment - -k 2 --json < reviews.txt
    """
    from .encoder_output import labels_line, read_texts
    from .runtime import Encoder

    encoder = Encoder(model_dir, provider=provider, threads=threads, truncate=not no_truncate)
    results = encoder.classify(read_texts(texts, sys.stdin), top_k=top_k, batch_size=batch_size)
    for i, labels in enumerate(results):
        click.echo(labels_line(i, labels, as_json))


if __name__ == "__main__":
    main()
