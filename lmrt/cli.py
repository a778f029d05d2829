"""The ``lmrt`` command line. Heavy imports (torch, transformers) happen only inside ``export``.

Every error the user can cause is one ``error:`` line on stderr and exit status 1, and every option
is checked before anything slow starts: click's own usage errors, values out of range (named by the
flag typed), text that is not UTF-8, empty paths. ``export`` and ``quantize`` treat SIGTERM like
Ctrl-C: what they were writing is removed and they exit with 128 + the signal's number.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import sys
import time

import click

from . import __version__


class _Fail(click.ClickException):
    """A one-line error on stderr and exit status 1 (or ``exit_code``)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _one_line_usage(call, *args, **kwargs):
    """click's usage errors (unknown option, missing argument, a value of the wrong type) as one line."""
    try:
        return call(*args, **kwargs)
    except click.exceptions.NoArgsIsHelpError:
        raise
    except click.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        raise _Fail(f"{e.format_message()}{hint}") from None


class _Commands(click.Group):
    def make_context(self, *args, **kwargs):
        return _one_line_usage(super().make_context, *args, **kwargs)

    def invoke(self, ctx):
        return _one_line_usage(super().invoke, ctx)


def _flag(param: click.Parameter) -> str:
    """The option as the user may have typed it ("-o/--output"), or the argument's name."""
    return "/".join(param.opts) if isinstance(param, click.Option) else param.human_readable_name.rstrip(".")


def is_utf8(text: str) -> bool:
    """False for text decoded with errors="surrogateescape" from bytes that are not UTF-8 (how
    Python reads argv, and stdin in some locales)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_strings(ctx: click.Context) -> None:
    """Paths may not be empty; text (prompts, --system, --stop) must be UTF-8. Text from argv that
    is not UTF-8 reaches Python as lone surrogates, which no tokenizer takes."""
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        values = value if isinstance(value, (tuple, list)) else [value]
        for v in values:
            if not isinstance(v, str):
                continue
            if isinstance(param.type, click.Path) and not v.strip():
                raise _Fail(f"{_flag(param)} is an empty path")
            if isinstance(param.type, click.types.StringParamType) and not is_utf8(v):
                raise _Fail(f"{_flag(param)} is not valid UTF-8 text")


def _errors_to_one_line(fn):
    """Turn the errors users cause (bad paths, options, models) into one line instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .export.errors import ExportError
        from .quantize.errors import QuantizeError
        from .runtime.config import ConfigError, GenerationConfig
        from .runtime.errors import first_line

        try:
            _check_strings(click.get_current_context())
            return fn(*args, **kwargs)
        except ConfigError as e:  # name the flag the user typed, not the Python field
            raise _Fail(e.named(GenerationConfig.flag_of(e.field))) from None
        except KeyboardInterrupt:
            click.echo("", err=True)
            sys.exit(130)
        except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            sys.exit(128 + signal.SIGPIPE)
        except (ExportError, QuantizeError, ValueError, ImportError, OSError) as e:  # ManifestError etc. are ValueErrors
            raise _Fail(first_line(e)) from None

    return wrapper


def _writes_a_directory(fn):
    """For commands that write OUTPUT: SIGTERM unwinds like Ctrl-C (SIGINT), so the partial directory
    is removed; either ends with one line and exit status 128 + the signal's number. A signal that
    lands inside an import or a library can come out as another exception: having been signalled is
    what counts. A second signal ends the process at once (the next run removes what it left)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        received: list[int] = []

        def interrupt(signum, frame):
            received.append(signum)
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt()

        previous = {}
        for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            try:
                if signal.getsignal(sig) is default:  # not one the caller ignores (a background job's SIGINT)
                    previous[sig] = signal.signal(sig, interrupt)
            except ValueError:  # not the main thread: leave signals alone
                pass
        try:
            return fn(*args, **kwargs)
        except BaseException:
            if not received:
                raise
            name = signal.Signals(received[0]).name
            raise _Fail(f"interrupted by {name}; nothing was written to {kwargs['output']}", 128 + received[0]) from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    return wrapper


def _checked(test, requirement: str):
    """A click callback refusing a value for which ``test`` is false: "FLAG must be REQUIREMENT"."""

    def callback(ctx, param, value):
        if value is not None and not test(value):
            raise _Fail(f"{_flag(param)} must be {requirement}, got {value}")
        return value

    return callback


def _at_least(minimum: int):
    return _checked(lambda v: v >= minimum, f"a whole number, at least {minimum}")


def _threads(ctx, param, value):
    from .runtime.session import max_threads

    return _checked(lambda v: 1 <= v <= max_threads(), f"a positive integer, at most {max_threads()} (this machine's CPUs)")(
        ctx, param, value
    )


def _one_of(**flags: bool) -> str | None:
    """The one flag given among exclusive ones (``fp16=True, int8=False``), None for none."""
    given = [name for name, on in flags.items() if on]
    if len(given) > 1:
        raise _Fail(" and ".join(f"--{name}" for name in given) + " exclude each other; choose one")
    return given[0] if given else None


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lmrt")
def main() -> None:
    """lmrt: export language models to ONNX and run them without PyTorch."""


def _quality_gate_options(fn):
    """The quantization gate's options, shared by export and quantize."""
    options = [
        click.option(
            "--max-ppl-increase",
            type=float,
            callback=_checked(lambda v: math.isfinite(v) and v >= 0, "a finite number of percent, 0 or more"),
            help="Largest perplexity increase over fp32 allowed, in percent (default: int8 2, int4 15).",
        ),
        click.option("--allow-degraded", is_flag=True, help="Keep a quantized model even if it fails the gate."),
        click.option(
            "--eval-text",
            type=click.Path(),
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
    """The gate's API arguments, once --eval-text is known to be readable UTF-8 (before anything loads)."""
    from .quantize.evaltext import read_text

    if eval_text is not None:
        read_text(eval_text, "--eval-text")
    out = {"allow_degraded": allow_degraded, "eval_text": eval_text}
    if max_ppl_increase is not None:
        out["max_increase"] = max_ppl_increase / 100.0
    return out


_OUTPUT = click.option("-o", "--output", required=True, type=click.Path(), help="Model directory to write.")
_FORCE = click.option("--force", is_flag=True, help="Replace OUTPUT if it is an lmrt model directory.")
_TARGET = click.option(
    "--target",
    help="The onnxruntime the graph must run on: ort-1.19, ort-1.20, ort-1.22, ort-1.23, ort-1.24, jetson-jp6 "
    "or latest [default: the installed onnxruntime's]. Forms it lacks take plainer operators (see `lmrt doctor`).",
)


@main.command()
@click.argument("source", type=click.Path())
@_OUTPUT
@click.option("--fp16", is_flag=True, help="float16 weights and compute (for GPU providers).")
@click.option("--int8", is_flag=True, help="8-bit block-quantized weights.")
@click.option("--int4", is_flag=True, help="4-bit block-quantized weights (8-bit embeddings).")
@_quality_gate_options
@click.option(
    "--task",
    type=click.Choice(["generate", "embed", "classify"]),
    help="generate (decoders), embed or classify (encoders) [default: detected from the model].",
)
@_FORCE
@_TARGET
@click.option(
    "--tolerance",
    type=float,
    callback=_checked(lambda v: math.isfinite(v) and v > 0, "a finite number above 0"),
    help="Largest logit difference from PyTorch allowed, relative to the largest logit [default: 1e-3; fp16 2e-2].",
)
@_errors_to_one_line
@_writes_a_directory
def export(source, output, fp16, int8, int4, task, force, target, tolerance, max_ppl_increase, allow_degraded, eval_text, compute) -> None:
    """Export SOURCE to an ONNX model directory, validated against PyTorch.

    SOURCE is a Hugging Face Hub id, a local Hugging Face model directory, or a .gguf file.
    With --int8 / --int4 the validated fp32 graph is quantized and must pass the quality gate:
    perplexity on an evaluation text may not rise more than --max-ppl-increase over fp32. From a
    GGUF file (Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K), the file's own blocks are kept
    wherever MatMulNBits holds them exactly. BERT-family
    encoders are exported for `lmrt embed` (a sentence-transformers model) or `lmrt classify` (a
    *ForSequenceClassification model); --int8 gates them on cosine similarity / label agreement.

    \b
    Examples:
      lmrt export SmolLM2-135M-Instruct.Q4_1.gguf -o models/smollm2 --int4
      lmrt export ./my-finetuned-llama -o models/mine --int8 --force
      lmrt export gpt2 -o models/gpt2
      lmrt export ./all-MiniLM-L6-v2 -o models/minilm --int8
    """
    precision = _one_of(fp16=fp16, int8=int8, int4=int4) or "fp32"
    options = {}
    if precision in ("int8", "int4"):
        options = _gate_kwargs(max_ppl_increase, allow_degraded, eval_text)
        if compute:
            options["compute"] = compute
    elif max_ppl_increase is not None or allow_degraded or eval_text is not None or compute:
        raise _Fail("--max-ppl-increase, --allow-degraded, --eval-text and --compute apply to --int8 / --int4 only")
    try:
        from .export import export_model
    except ImportError as e:
        raise _Fail(f"export needs the export extra: pip install 'lmrt[export]' ({e})") from None
    export_model(source, output, force=force, tolerance=tolerance, precision=precision, task=task, target=target, **options)


@main.command()
@click.argument("model_dir", type=click.Path())
@_OUTPUT
@click.option("--int8", is_flag=True, help="8-bit block-quantized weights.")
@click.option("--int4", is_flag=True, help="4-bit block-quantized weights (8-bit embeddings).")
@click.option("--gguf", type=click.Path(), help="Take the blocks of this GGUF file (Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) where they fit.")
@click.option("--no-gguf-blocks", is_flag=True, help="Quantize from the float weights even if the source was a GGUF file.")
@_quality_gate_options
@_FORCE
@_TARGET
@_errors_to_one_line
@_writes_a_directory
def quantize(model_dir, output, int8, int4, gguf, no_gguf_blocks, max_ppl_increase, allow_degraded, eval_text, compute, force, target):
    """Quantize the fp32 model in MODEL_DIR (written by `lmrt export`) into OUTPUT.

    The result must pass the quality gate (see `lmrt export --help`). When MODEL_DIR was exported
    from a GGUF file that is still in place, its blocks are kept where they fit.

    \b
    Examples:
      lmrt quantize models/smollm2 -o models/smollm2-int8 --int8
      lmrt quantize models/smollm2 -o models/smollm2-int4 --int4 --max-ppl-increase 5
    """
    import dataclasses

    scheme = _one_of(int8=int8, int4=int4)
    if not scheme:
        raise _Fail("choose --int8 or --int4")
    if gguf is not None and no_gguf_blocks:
        raise _Fail("--gguf and --no-gguf-blocks contradict each other")
    gate = _gate_kwargs(max_ppl_increase, allow_degraded, eval_text)
    from .quantize import quantize_directory, scheme_for

    chosen = scheme_for(scheme)
    if compute:
        chosen = dataclasses.replace(chosen, compute=compute)
    source = None if no_gguf_blocks else (gguf if gguf is not None else "auto")
    quantize_directory(model_dir, output, chosen, gguf=source, force=force, target=target, **gate)


@main.command("eval")
@click.argument("model_dir", type=click.Path())
@click.option("--text", "text_file", type=click.Path(), help="UTF-8 text file (default: Python's reference manual).")
@click.option("--max-tokens", type=int, callback=_at_least(2), help="Score only the first N tokens.")
@click.option("--window", type=int, help="Tokens per window (default: the model's context).")
@click.option("--stride", type=int, help="Tokens between window starts (default: half a window).")
@click.option("--provider", default="auto", show_default=True, help="auto, tensorrt, cuda or cpu.")
@click.option("--threads", type=int, callback=_threads, help="CPU threads.")
@_errors_to_one_line
def eval_(model_dir, text_file, max_tokens, window, stride, provider, threads) -> None:
    """Print the perplexity of the model in MODEL_DIR on a text.

    \b
    Examples:
      lmrt eval models/smollm2-int4 --text article.txt
      lmrt eval models/smollm2 --max-tokens 2048
    """
    from .quantize.evaltext import read_text, reference_text
    from .runtime import Generator
    from .runtime.scoring import resolve_windows

    flags = ("--window", "--stride")
    resolve_windows(window, stride, sys.maxsize, names=flags)  # before loading; the context is checked after
    if text_file is not None:
        text, name = read_text(text_file, "--text"), text_file
    else:
        text, name = reference_text(), "Python reference manual"
    gen = Generator(model_dir, provider=provider, threads=threads)
    window, stride = resolve_windows(window, stride, gen.context_length, names=flags)
    ids = gen.encode(text)[:max_tokens]
    if len(ids) < 2:
        raise _Fail(f"{name} has {len(ids)} token{'s' if len(ids) != 1 else ''}; scoring needs at least 2")
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
    """One CLI option per GenerationConfig field, built from the field's metadata (help, flag, short
    name, choices); unset options keep the model's defaults."""
    import typing

    from .runtime import GenerationConfig

    hints = typing.get_type_hints(GenerationConfig)
    for f in reversed([f for f in GenerationConfig.options() if f.metadata.get("cli", True)]):
        meta = f.metadata
        names = [meta["short"]] if meta.get("short") else []
        names.append(GenerationConfig.flag(f))
        kwargs = {"help": meta["help"], "multiple": bool(meta.get("multiple"))}
        if meta.get("choices"):
            kwargs["type"] = click.Choice(meta["choices"])
        elif meta.get("metavar") == "FILE":  # the option names a file; the field takes its text
            kwargs.update(type=click.Path(exists=True, dir_okay=False), metavar="FILE", callback=_file_text)
        else:
            kwargs["type"] = _scalar_type(hints[f.name])
        fn = click.option(*names, f.name, **kwargs)(fn)
    return fn


def _file_text(ctx, param, path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise click.BadParameter(f"cannot read {path}: {e}") from None


def _scalar_type(hint) -> type:
    """The click type of a config field's type hint: ``int | None`` is int, ``tuple[str, ...]`` str."""
    import typing

    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return args[0]
    return _scalar_type(args[0]) if args else hint


def _given(options: dict) -> dict:
    """The generation options typed on the command line: a repeatable option never given is unset."""
    return {k: (None if v == () else v) for k, v in options.items()}


def _runtime_options(fn):
    for option in reversed(
        [
            click.option("--provider", default="auto", show_default=True, help="auto, tensorrt, cuda or cpu."),
            click.option(
                "--threads", type=int, callback=_threads, help="CPU threads (default: onnxruntime's choice, the physical cores)."
            ),
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
def generate(model_dir, prompts, chat, system, provider, threads, as_json, stats, **options) -> None:
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
      lmrt generate models/smollm2 "Paris is in" --chat --json-schema city.schema.json
      lmrt generate models/smollm2 "Is the sky blue?" --chat --choice yes --choice no
    """
    import json

    from .runtime import Generator

    if system is not None and not chat:
        raise _Fail("--system applies to --chat only; add --chat or drop --system")
    if prompts.count("-") > 1:
        raise _Fail('PROMPT "-" (stdin) may be given once')
    prompts = [_read_stdin() if p == "-" else p for p in prompts]
    options = _given(options)
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


def _read_stdin() -> str:
    """All of stdin as UTF-8 text."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Fail(f'stdin (PROMPT "-") is not UTF-8 text ({e.reason} at byte {e.start})') from None


@main.command("chat")
@click.argument("model_dir", type=click.Path())
@_generation_options
@click.option("--system", help="System message, kept for the whole conversation.")
@_runtime_options
@_errors_to_one_line
def chat_(model_dir, system, provider, threads, **options) -> None:
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

    options = _given(options)
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 is refused alone, not with the rest of stdin
        sys.stdin.reconfigure(errors="surrogateescape")
    terminal_chat.run(Generator(model_dir, provider=provider, threads=threads), system, options)


@main.command()
@click.argument("model_dir", type=click.Path())
@click.option("--prompt-tokens", type=int, default=128, show_default=True, help="Prompt length.")
@click.option("--new-tokens", type=int, default=128, show_default=True, help="Tokens to generate (greedy, stop tokens ignored).")
@click.option("--runs", type=int, default=3, show_default=True, help="Measured runs, after one warm-up run.")
@click.option(
    "--speculation", type=click.Choice(["auto", "on", "off"]), default="off", show_default=True,
    help="Prompt-lookup speculation (the prompt is repeated prose, so auto measures a best case).",
)
@_runtime_options
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
@_errors_to_one_line
def bench(model_dir, prompt_tokens, new_tokens, runs, speculation, provider, threads, as_json) -> None:
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

    result = benchmark.run(model_dir, prompt_tokens, new_tokens, runs, provider, threads, speculation)
    click.echo(json.dumps(dataclasses.asdict(result)) if as_json else benchmark.as_table(result))


@main.command()
@click.argument("model_dir", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8000, type=int, show_default=True, help="Port to listen on (0: any free one).")
@click.option("--slots", default=4, type=int, show_default=True, help="Requests generated at once: rows of the KV cache.")
@click.option("--ctx-size", type=int, help="Tokens per slot, prompt and output together [default: 2048, or the model's context if smaller].")
@click.option("--api-key", help="Require 'Authorization: Bearer KEY' on every route but /health.")
@click.option("--api-key-file", type=click.Path(dir_okay=False), help="Read the API key from the first line of this file.")
@click.option("--max-queue", default=64, type=int, show_default=True, help="Requests that may wait for a slot; more are refused with 503.")
@click.option("--prefill-chunk", default=256, type=int, show_default=True, help="Prompt tokens read per step while other slots decode.")
@click.option("--model-name", help="The model id clients send [default: the directory's name].")
@_runtime_options
@click.option("--ray", "on_ray", is_flag=True, help="Serve replicas of the engine on Ray Serve (the ray extra); MODEL_DIR may be a file:// URI.")
@click.option("--address", help="With --ray: the Ray cluster to join (host:port, or auto) [default: start one on this machine].")
@click.option("--replicas", type=int, help="With --ray: a fixed number of replicas [default: 1].")
@click.option("--min-replicas", type=int, help="With --ray: autoscale on the engines' busy slots and queue, from this many replicas...")
@click.option("--max-replicas", type=int, help="...to this many.")
@_errors_to_one_line
def serve(model_dir, host, port, slots, ctx_size, api_key, api_key_file, max_queue, prefill_chunk, model_name, provider,
          threads, on_ray, address, replicas, min_replicas, max_replicas) -> None:  # fmt: skip
    """Serve the model in MODEL_DIR over HTTP with OpenAI's API.

    Routes: POST /v1/chat/completions, POST /v1/completions (or, for an embedding model, POST
    /v1/embeddings), GET /v1/models, GET /health, GET /metrics (Prometheus). The KV cache for all
    slots is reserved at start: slots x ctx-size x (2 x layers x KV heads x head size x bytes per
    value).

    \b
    Examples:
      lmrt serve models/smollm2 --slots 8
      lmrt serve models/smollm2 --port 8080 --ctx-size 4096 --api-key-file key.txt
      lmrt serve models/smollm2 --ray --replicas 2 --threads 1
      lmrt serve file:///shared/smollm2 --ray --address auto --min-replicas 1 --max-replicas 8
      curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}'
    """
    from .serve import ServeError, read_api_key
    from .serve import serve as run_server

    if api_key and api_key_file:
        raise _Fail("--api-key and --api-key-file contradict each other; give one")
    ray_only = {"--address": address, "--replicas": replicas, "--min-replicas": min_replicas, "--max-replicas": max_replicas}
    if not on_ray and any(v is not None for v in ray_only.values()):
        raise _Fail(f"{next(k for k, v in ray_only.items() if v is not None)} needs --ray")
    try:
        if api_key_file:
            api_key = read_api_key(api_key_file)
        if on_ray:
            _serve_on_ray(model_dir, host, port, slots, ctx_size, api_key, max_queue, prefill_chunk, model_name, provider,
                          threads, address, replicas, min_replicas, max_replicas)  # fmt: skip
            return
        run_server(
            model_dir, lambda line: click.echo(line, err=True), host=host, port=port, slots=slots, ctx_size=ctx_size,
            api_key=api_key, provider=provider, threads=threads, max_queue=max_queue, prefill_chunk=prefill_chunk,
            model_name=model_name,
        )  # fmt: skip
    except ServeError as e:
        raise _Fail(str(e)) from None


def _serve_on_ray(model_dir, host, port, slots, ctx_size, api_key, max_queue, prefill_chunk, model_name, provider, threads,
                  address, replicas, min_replicas, max_replicas) -> None:  # fmt: skip
    from .serve import ServeError, check_settings, default_model_name

    try:
        from .serve import ray_deployment as on_ray
    except ImportError as e:
        raise ServeError(f"lmrt serve --ray needs the ray extra: pip install 'lmrt[ray]' ({e})") from None
    on_ray.check_replicas(replicas, min_replicas, max_replicas, port)
    path = on_ray.model_path(model_dir)
    manifest, ctx_size = check_settings(path, slots, ctx_size, max_queue, prefill_chunk, api_key)
    if manifest.task != "generate":
        raise ServeError(f"lmrt serve --ray serves generation models; {model_dir} is an {manifest.task} model (serve it without --ray)")
    settings = on_ray.ReplicaSettings(
        os.path.abspath(path), model_name or default_model_name(path), slots, ctx_size, max_queue, prefill_chunk, provider,
        threads, api_key,
    )  # fmt: skip
    on_ray.serve_on_ray(settings, lambda line: click.echo(line, err=True), host, port, address, replicas, min_replicas, max_replicas)


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

        _print_rows(encoder_rows(m, directory_size(model_dir)) + [_onnxruntime_row(m), ("providers", ", ".join(available_providers()) or "none")])
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

    def validation() -> str:
        return (
            f"max |Δlogit| {v['max_abs_diff']:.2e} (relative {v['max_rel_diff']:.2e}), "
            f"greedy agreement {v['greedy_agreement']:.1%}, {'passed' if v.get('passed') else 'FAILED'}"
        )

    def quantization() -> str:
        kept = ", ".join(f"{n} {k}" for k, n in q.get("gguf_blocks_kept", {}).items())
        return (
            f"{q['name']}: {q['bits']}-bit {q['method']} blocks of {q['block_size']}, lm_head/embeddings "
            f"{q['head_bits']}-bit, compute {q.get('compute', 'int8')}" + (f"; kept from GGUF: {kept}" if kept else "")
        )

    def quality() -> str:
        return (
            f"perplexity {g['perplexity']:.3f} vs fp32 {g['perplexity_reference']:.3f} ({g['increase']:+.2%}, "
            f"allowed +{g['max_increase']:.0%}), top-1 agreement {g['top1_agreement']:.1%}"
            + (" (kept with --allow-degraded)" if g.get("allowed_degraded") else "")
        )

    q, g = m.quantization, m.quality
    for name, record, describe in (("validation", v, validation), ("quantization", q, quantization), ("quality", g, quality)):
        if record:
            try:
                rows.append((name, describe()))
            except (KeyError, TypeError, ValueError, AttributeError):  # a hand-edited record: show the rest
                rows.append((name, "unreadable in lmrt.json"))
    rows.append(_onnxruntime_row(m))
    rows.append(("providers", ", ".join(available_providers()) or "none"))
    _print_rows(rows)


def _installed_onnxruntime() -> str | None:
    try:
        from .runtime.compat import installed_onnxruntime

        return installed_onnxruntime()
    except ImportError:
        return None


def _onnxruntime_row(m) -> tuple[str, str]:
    from .runtime.compat import status_line

    return ("requires", status_line(m, _installed_onnxruntime()))


@main.command()
@click.argument("model_dir", type=click.Path(), required=False)
@_errors_to_one_line
def doctor(model_dir: str | None) -> None:
    """What this machine offers (Python, onnxruntime, providers, CPU features, export profiles) and,
    with MODEL_DIR, what the model needs and whether this machine meets it.

    \b
    Example:
      lmrt doctor models/smollm2
    """
    from .doctor import machine_rows, model_rows

    rows = machine_rows()
    if model_dir is not None:
        from .runtime import load_manifest

        rows += model_rows(model_dir, load_manifest(model_dir), _installed_onnxruntime())
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
