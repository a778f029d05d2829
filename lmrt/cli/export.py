"""``lmrt export`` and ``lmrt quantize``: the commands that write a model directory."""

from __future__ import annotations

import math

import click

from .errors import CliError, errors_to_one_line, one_of, writes_a_directory
from .options import apply, checked


def quality_gate_options(fn):
    """The quantization gate's options, shared by export and quantize."""
    return apply(fn, [
        click.option(
            "--max-ppl-increase",
            type=float,
            callback=checked(lambda v: math.isfinite(v) and v >= 0, "a finite number of percent, 0 or more"),
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
    ])  # fmt: skip


def gate_kwargs(max_ppl_increase, allow_degraded, eval_text) -> dict:
    """The gate's API arguments, once --eval-text is known to be readable UTF-8 (before anything loads)."""
    from ..quantize.evaltext import read_text

    if eval_text is not None:
        read_text(eval_text, "--eval-text")
    out = {"allow_degraded": allow_degraded, "eval_text": eval_text}
    if max_ppl_increase is not None:
        out["max_increase"] = max_ppl_increase / 100.0
    return out


OUTPUT = click.option("-o", "--output", required=True, type=click.Path(), help="Model directory to write.")
FORCE = click.option("--force", is_flag=True, help="Replace OUTPUT if it is an lmrt model directory.")
TARGET = click.option(
    "--target",
    help="The onnxruntime the graph must run on: ort-1.19, ort-1.20, ort-1.22, ort-1.23, ort-1.24, jetson-jp6 "
    "or latest [default: the installed onnxruntime's]. Forms it lacks take plainer operators (see `lmrt doctor`).",
)
@click.command("export")
@click.argument("source", type=click.Path())
@OUTPUT
@click.option("--fp16", is_flag=True, help="float16 weights and compute (for GPU providers).")
@click.option("--int8", is_flag=True, help="8-bit block-quantized weights.")
@click.option("--int4", is_flag=True, help="4-bit block-quantized weights (8-bit embeddings).")
@quality_gate_options
@click.option(
    "--task",
    type=click.Choice(["generate", "embed", "classify"]),
    help="generate (decoders), embed or classify (encoders) [default: detected from the model].",
)
@FORCE
@TARGET
@click.option(
    "--tolerance",
    type=float,
    callback=checked(lambda v: math.isfinite(v) and v > 0, "a finite number above 0"),
    help="Largest logit difference from PyTorch allowed, relative to the largest logit [default: 1e-3; fp16 2e-2].",
)
@click.option("--weights", type=click.Path(), help="A module of your own: its state_dict (torch.save(model.state_dict())).")
@click.option(
    "--tokenizer", type=click.Path(),
    help="A module of your own: its tokenizer.json, or its vocabulary (a JSON list, or one token per line in a .txt).",
)  # fmt: skip
@click.option("--max-length", type=click.IntRange(min=2), help="A module of your own: the longest sequence (a stateless one's window).")
@errors_to_one_line
@writes_a_directory
def export(
    source, output, fp16, int8, int4, task, force, target, tolerance, max_ppl_increase, allow_degraded, eval_text, compute,
    weights, tokenizer, max_length,
) -> None:  # fmt: skip
    """Export SOURCE to an ONNX model directory, validated against PyTorch.

    SOURCE is a Hugging Face Hub id, a local Hugging Face model directory, or a .gguf file; or a
    PyTorch module of your own, as path/to/model.py:make_model (a function or class that builds it)
    with --weights and --tokenizer, or a torch.export program saved with torch.export.save (a .pt2
    file, dynamic batch and sequence sizes) with --tokenizer (docs: Your own PyTorch model).
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
      lmrt export model.py:make_model --weights lm.pt --tokenizer vocab.json -o models/lstm --int8
      lmrt export gpt.pt2 --tokenizer vocab.json -o models/gpt
    """
    precision = one_of(fp16=fp16, int8=int8, int4=int4) or "fp32"
    options = {}
    if precision in ("int8", "int4"):
        options = gate_kwargs(max_ppl_increase, allow_degraded, eval_text)
        if compute:
            options["compute"] = compute
    elif max_ppl_increase is not None or allow_degraded or eval_text is not None or compute:
        raise CliError("--max-ppl-increase, --allow-degraded, --eval-text and --compute apply to --int8 / --int4 only")
    try:
        from ..export import export_model
    except ImportError as e:
        raise CliError(f"export needs the export extra: pip install 'lmrt[export]' ({e})") from None
    own = {k: v for k, v in (("weights", weights), ("tokenizer", tokenizer), ("max_length", max_length)) if v is not None}
    export_model(source, output, force=force, tolerance=tolerance, precision=precision, task=task, target=target, **own, **options)


@click.command("quantize")
@click.argument("model_dir", type=click.Path())
@OUTPUT
@click.option("--int8", is_flag=True, help="8-bit block-quantized weights.")
@click.option("--int4", is_flag=True, help="4-bit block-quantized weights (8-bit embeddings).")
@click.option("--gguf", type=click.Path(), help="Take the blocks of this GGUF file (Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) where they fit.")
@click.option("--no-gguf-blocks", is_flag=True, help="Quantize from the float weights even if the source was a GGUF file.")
@quality_gate_options
@FORCE
@TARGET
@errors_to_one_line
@writes_a_directory
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

    scheme = one_of(int8=int8, int4=int4)
    if not scheme:
        raise CliError("choose --int8 or --int4")
    if gguf is not None and no_gguf_blocks:
        raise CliError("--gguf and --no-gguf-blocks contradict each other")
    gate = gate_kwargs(max_ppl_increase, allow_degraded, eval_text)
    from ..quantize import quantize_directory, scheme_for

    chosen = scheme_for(scheme)
    if compute:
        chosen = dataclasses.replace(chosen, compute=compute)
    source = None if no_gguf_blocks else (gguf if gguf is not None else "auto")
    quantize_directory(model_dir, output, chosen, gguf=source, force=force, target=target, **gate)

