"""``lmrt generate`` (completions of prompts) and ``lmrt chat`` (a conversation in the terminal)."""

from __future__ import annotations

import sys
import time

import click

from .errors import CliError, errors_to_one_line
from .options import generation_options, given, runtime_options


@click.command("generate")
@click.argument("model_dir", type=click.Path())
@click.argument("prompts", metavar="PROMPT...", nargs=-1, required=True)
@generation_options
@click.option("--chat", is_flag=True, help="Send each PROMPT as a user message through the model's chat template.")
@click.option("--system", help="System message for --chat.")
@runtime_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per sequence instead of text.")
@click.option("--stats", is_flag=True, help="Print tokens, finish reason and speed to stderr.")
@errors_to_one_line
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

    from ..runtime import Generator

    if system is not None and not chat:
        raise CliError("--system applies to --chat only; add --chat or drop --system")
    if prompts.count("-") > 1:
        raise CliError('PROMPT "-" (stdin) may be given once')
    prompts = [read_stdin() if p == "-" else p for p in prompts]
    options = given(options)
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


def read_stdin() -> str:
    """All of stdin as UTF-8 text."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CliError(f'stdin (PROMPT "-") is not UTF-8 text ({e.reason} at byte {e.start})') from None


@click.command("chat")
@click.argument("model_dir", type=click.Path())
@generation_options
@click.option("--system", help="System message, kept for the whole conversation.")
@runtime_options
@errors_to_one_line
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
    from .. import terminal_chat
    from ..runtime import Generator

    options = given(options)
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 is refused alone, not with the rest of stdin
        sys.stdin.reconfigure(errors="surrogateescape")
    terminal_chat.run(Generator(model_dir, provider=provider, threads=threads), system, options)

