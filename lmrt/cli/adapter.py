"""``lmrt adapter``: a PEFT LoRA adapter added to an exported model directory."""

from __future__ import annotations

import click

from .errors import errors_to_one_line


@click.command("adapter")
@click.argument("model_dir", type=click.Path())
@click.argument("peft_dir", type=click.Path())
@click.option("--name", required=True, help="The adapter's name: what `--adapter NAME` picks (letters, digits, '.', '_', '-').")
@click.option("--eval-text", type=click.Path(), help="A text whose perplexity, with the adapter and without it, is recorded in the manifest (default: the built-in reference text).")
@errors_to_one_line
def adapter(model_dir, peft_dir, name, eval_text) -> None:
    """Add the LoRA adapter in PEFT_DIR (adapter_config.json and adapter_model.safetensors, as PEFT's
    save_pretrained writes them) to the exported model in MODEL_DIR.

    The base may be fp32, fp16, int8 or int4; the adapter's matrices stay float. Rows with
    different adapters run in one batch. The perplexity of an evaluation text with the adapter
    and without it is measured and recorded with the adapter (lmrt info shows it).

    \b
    Examples:
      lmrt adapter models/smollm2 my-lora --name support
      lmrt generate models/smollm2 "Ticket: my order is late" --adapter support
    """
    from ..export.adapters import add_adapter

    add_adapter(model_dir, peft_dir, name, eval_text=eval_text)
