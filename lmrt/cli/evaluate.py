"""``lmrt eval`` (perplexity on a text) and ``lmrt bench`` (speed and memory)."""

from __future__ import annotations

import sys
import time

import click

from .errors import CliError, errors_to_one_line
from .options import at_least, runtime_options


@click.command("eval")
@click.argument("model_dir", type=click.Path())
@click.option("--text", "text_file", type=click.Path(), help="UTF-8 text file (default: Python's reference manual).")
@click.option("--max-tokens", type=int, callback=at_least(2), help="Score only the first N tokens.")
@click.option("--window", type=int, help="Tokens per window (default: the model's context).")
@click.option("--stride", type=int, callback=at_least(1), help="Tokens between window starts (default: half a window).")
@click.option("--adapter", help="Score with this LoRA adapter of the model directory (default: the base model).")
@runtime_options
@errors_to_one_line
def eval_(model_dir, text_file, max_tokens, window, stride, adapter, provider, threads) -> None:
    """Print the perplexity of the model in MODEL_DIR on a text.

    \b
    Examples:
      lmrt eval models/smollm2-int4 --text article.txt
      lmrt eval models/smollm2 --max-tokens 2048
    """
    from ..quantize.evaltext import read_text, reference_text
    from ..runtime import Generator
    from ..runtime.scoring import resolve_windows

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
        raise CliError(f"{name} has {len(ids)} token{'s' if len(ids) != 1 else ''}; scoring needs at least 2")
    start = time.perf_counter()
    score = gen.score(ids, window=window, stride=stride, adapter=adapter)
    elapsed = time.perf_counter() - start
    click.echo(f"perplexity {score.perplexity:.4f}")
    click.echo(
        f"[{name}: {len(ids)} tokens, {score.num_scored} scored, {score.mean_nll:.4f} nats/token, "
        f"{score.num_scored / elapsed:.0f} tokens/s, provider {gen.provider}]",
        err=True,
    )


@click.command("bench")
@click.argument("model_dir", type=click.Path())
@click.option("--prompt-tokens", type=int, default=128, show_default=True, help="Prompt length.")
@click.option("--new-tokens", type=int, default=128, show_default=True, help="Tokens to generate (greedy, stop tokens ignored).")
@click.option("--runs", type=int, default=3, show_default=True, help="Measured runs, after one warm-up run.")
@click.option(
    "--speculation", type=click.Choice(["auto", "on", "off"]), default="off", show_default=True,
    help="Prompt-lookup speculation (the prompt is repeated prose, so auto measures a best case).",
)
@click.option("--adapter", help="Generate with this LoRA adapter of the model directory (default: the base model).")
@runtime_options
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
@errors_to_one_line
def bench(model_dir, prompt_tokens, new_tokens, runs, speculation, adapter, provider, threads, as_json) -> None:
    """Measure prefill speed, time to first token, decode speed and peak memory of MODEL_DIR.

    Medians over --runs runs of greedy decoding through lmrt's own decode loop. Peak memory is the
    process's peak resident size, model loading included.

    \b
    Examples:
      lmrt bench models/smollm2-int8
      lmrt bench models/smollm2-int4 --prompt-tokens 512 --new-tokens 64 --runs 5 --json
      lmrt bench models/smollm2-int8 --adapter support
    """
    import dataclasses
    import json

    from .. import bench as benchmark

    result = benchmark.run(model_dir, prompt_tokens, new_tokens, runs, provider, threads, speculation, adapter)
    click.echo(json.dumps(dataclasses.asdict(result)) if as_json else benchmark.as_table(result))

