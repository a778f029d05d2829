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

        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("", err=True)
            sys.exit(130)
        except (ExportError, ValueError, ImportError, OSError) as e:  # ManifestError etc. are ValueErrors
            raise _Fail(str(e).splitlines()[0] if str(e) else type(e).__name__) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lmrt")
def main() -> None:
    """lmrt: export language models to ONNX and run them without PyTorch."""


@main.command()
@click.argument("source")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Model directory to write.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option(
    "--tolerance",
    type=float,
    default=1e-3,
    show_default=True,
    help="Largest logit difference from PyTorch allowed, relative to the largest logit.",
)
@_errors_to_one_line
def export(source: str, output: str, force: bool, tolerance: float) -> None:
    """Export SOURCE to an ONNX model directory, validated against PyTorch.

    SOURCE is a Hugging Face Hub id, a local Hugging Face model directory, or a .gguf file.

    \b
    Examples:
      lmrt export SmolLM2-135M-Instruct.Q4_1.gguf -o models/smollm2
      lmrt export ./my-finetuned-llama -o models/mine --force
      lmrt export gpt2 -o models/gpt2
    """
    try:
        from .export import export_model
    except ImportError as e:
        raise _Fail(f"export needs the export extra: pip install 'lmrt[export]' ({e})") from None
    export_model(source, output, force=force, tolerance=tolerance)


def _generation_options(fn):
    """One CLI option per GenerationConfig field; unset options keep the model's defaults."""
    options = [
        click.option("-n", "--max-new-tokens", type=int, help="Tokens to generate at most."),
        click.option("-t", "--temperature", type=float, help="0 is greedy decoding (the default)."),
        click.option("--top-k", type=int, help="Sample among the k most likely tokens (0: off)."),
        click.option("--top-p", type=float, help="Nucleus sampling threshold in (0, 1]."),
        click.option("--repetition-penalty", type=float, help="Above 1 discourages repeats."),
        click.option("--seed", type=int, help="Seed for reproducible sampling."),
        click.option("--stop", multiple=True, help="Stop before this string (repeatable)."),
        click.option("--stop-token-id", "stop_token_ids", type=int, multiple=True, help="Stop at this token id (repeatable; default: the model's end-of-sequence ids)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.command()
@click.argument("model_dir", type=click.Path())
@click.argument("prompt")
@_generation_options
@click.option("--chat", is_flag=True, help="Send PROMPT as a user message through the model's chat template.")
@click.option("--system", help="System message for --chat.")
@click.option("--provider", default="auto", show_default=True, help="auto, tensorrt, cuda or cpu.")
@click.option("--threads", type=int, help="CPU threads (default: onnxruntime's choice, the physical cores).")
@click.option("--stats", is_flag=True, help="Print tokens, finish reason and speed to stderr.")
@_errors_to_one_line
def generate(model_dir, prompt, chat, system, provider, threads, stats, stop, stop_token_ids, **options) -> None:
    """Generate a completion of PROMPT with the model in MODEL_DIR, streamed to stdout.

    PROMPT "-" reads the prompt from stdin.

    \b
    Examples:
      lmrt generate models/smollm2 "The capital of France is" -n 32
      lmrt generate models/smollm2 "What is the capital of France?" --chat
      echo "Once upon a time" | lmrt generate models/smollm2 - -t 0.8 --top-p 0.9 --seed 1
    """
    from .runtime import Generator

    if prompt == "-":
        prompt = sys.stdin.read()
    options["stop"] = stop or None
    options["stop_token_ids"] = stop_token_ids or None
    gen = Generator(model_dir, provider=provider, threads=threads)
    gen.config(**options)  # reject bad options before rendering or encoding the prompt
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        prompt = gen.chat_prompt(messages)
    start = time.perf_counter()
    stream = gen.stream(prompt, **options)
    for piece in stream:
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()
    if stats:
        elapsed = time.perf_counter() - start
        n = len(stream.token_ids)
        click.echo(
            f"[{n} tokens, finish: {stream.finish_reason}, {n / elapsed:.1f} tokens/s overall, provider {gen.provider}]",
            err=True,
        )


@main.command()
@click.argument("model_dir", type=click.Path())
@_errors_to_one_line
def info(model_dir: str) -> None:
    """Summarize the model in MODEL_DIR and list the execution providers available here.

    \b
    Example:
      lmrt info models/smollm2
    """
    import os

    from .runtime import load_manifest
    from .runtime.session import available_providers

    m = load_manifest(model_dir)
    a, t, p, v = m.architecture, m.tokenizer, m.provenance, m.validation
    size = sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir))
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
    rows.append(("providers", ", ".join(available_providers()) or "none"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
