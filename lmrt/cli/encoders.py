"""``lmrt embed`` and ``lmrt classify``: what an encoder model gives for each text."""

from __future__ import annotations

import sys

import click

from .errors import errors_to_one_line
from .options import apply, at_least, runtime_options


def encoder_options(fn):
    """Options shared by embed and classify."""
    return runtime_options(apply(fn, [
        click.option("--batch-size", type=int, default=32, show_default=True, callback=at_least(1),
                     help="Texts per run; texts are sorted by length, so each batch is padded only to its longest."),
        click.option("--no-truncate", is_flag=True,
                     help="Refuse a text longer than the model's maximum length instead of cutting it."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object per text."),
    ]))  # fmt: skip


@click.command("embed")
@click.argument("model_dir", type=click.Path())
@click.argument("texts", metavar="TEXT...", nargs=-1, required=True)
@encoder_options
@errors_to_one_line
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
    from ..encoder_output import embedding_line, read_texts
    from ..runtime import Encoder

    encoder = Encoder(model_dir, provider=provider, threads=threads, truncate=not no_truncate)
    vectors = encoder.embed(read_texts(texts, sys.stdin), batch_size=batch_size)
    for i, vector in enumerate(vectors):
        click.echo(embedding_line(i, vector, as_json))


@click.command("classify")
@click.argument("model_dir", type=click.Path())
@click.argument("texts", metavar="TEXT...", nargs=-1, required=True)
@click.option("-k", "--top-k", type=int, default=1, show_default=True, callback=at_least(1), help="Labels per text, best first.")
@encoder_options
@errors_to_one_line
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
    from ..encoder_output import labels_line, read_texts
    from ..runtime import Encoder

    encoder = Encoder(model_dir, provider=provider, threads=threads, truncate=not no_truncate)
    results = encoder.classify(read_texts(texts, sys.stdin), top_k=top_k, batch_size=batch_size)
    for i, labels in enumerate(results):
        click.echo(labels_line(i, labels, as_json))

