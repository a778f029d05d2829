"""``export_encoder``: an encoder source → ONNX graph + tokenizer + manifest, validated against
PyTorch, written atomically; quantized behind the encoder gate when asked. ``export_model`` calls it
for the tasks "embed" and "classify"."""

from __future__ import annotations

import os
from typing import Any, Callable

from ... import __version__
from ...quantize.graph_file import save_graph
from ...runtime.manifest import Architecture, EncoderInfo, EncoderIO, Graph, Manifest, TokenizerInfo
from ...runtime.model_dir import DATA_FILE, GRAPH_FILE, TOKENIZER_FILE
from ..architectures import Weights
from ..errors import ExportError
from ..graph import OPSET
from ..stages import Steps, provenance, record_validation, write_model
from .families import takes_token_types
from .graph import build_encoder
from .source import EncoderSource, load_encoder
from .validate import validate_encoder


def export_encoder(
    source: str,
    output: str,
    task: str,
    force: bool,
    tolerance: float,
    progress: Callable[[str], None],
    precision: str,
    scheme: Any = None,
    **quantize_options: Any,
) -> Manifest:
    """Export the encoder ``source`` for ``task`` into ``output`` (see ``export_model``, which
    checks the arguments first); with a quantization ``scheme``, the validated fp32 directory is
    quantized behind the encoder gate (``quantize_options`` go to ``quantize_directory``)."""
    if precision == "fp16":
        raise ExportError("--fp16 is for decoders; export encoders in fp32 or --int8")
    if scheme is not None:
        from ...quantize.pipeline import check_encoder_options

        check_encoder_options(scheme, None, quantize_options.get("max_increase"))
    step = Steps(progress)
    step(f"loading {source}")
    src = load_encoder(source, task)

    def write(out_dir: str) -> Manifest:
        return _write_directory(src, out_dir, tolerance, step)

    return write_model(output, write, _summary, step, scheme, gguf=None, force=force, **quantize_options)


def _write_directory(src: EncoderSource, out_dir: str, tolerance: float, step: Steps) -> Manifest:
    config = src.model.config
    types = "token_type_ids" if takes_token_types(src.family, config) else ""
    io = EncoderIO(output="logits" if src.task == "classify" else "embeddings", token_type_ids=types)
    step(f"building the {src.family.family} {src.task} graph ({config.num_hidden_layers} layers)")
    model = build_encoder(
        src.family, config, Weights(src.base_model), Weights(src.model) if src.task == "classify" else None, io,
        src.context_length, src.pooling, src.normalize, src.model.base_model_prefix, producer=f"lmrt {__version__}",
    )  # fmt: skip
    step("writing the graph")
    save_graph(model, out_dir)
    del model
    _save_tokenizer(src.tokenizer, os.path.join(out_dir, TOKENIZER_FILE))
    record = provenance(src, tolerance)
    record["export_options"]["task"] = src.task
    manifest = Manifest(
        architecture=_architecture(src),
        graph=Graph(file=GRAPH_FILE, data_file=DATA_FILE, opset=OPSET, dtype="float32", io=io),
        tokenizer=TokenizerInfo(TOKENIZER_FILE, bos_token_id=None, eos_token_ids=(), pad_token_id=src.tokenizer.pad_token_id),
        provenance=record,
        task=src.task,
        encoder=_encoder_info(src),
    )
    manifest.write(out_dir)

    step("validating against PyTorch")
    return record_validation(out_dir, manifest, validate_encoder(out_dir, src), tolerance, "outputs")


def _architecture(src: EncoderSource) -> Architecture:
    c = src.model.config
    hidden, heads = int(c.hidden_size), int(c.num_attention_heads)
    return Architecture(
        family=src.family.family,
        model_type=c.model_type,
        num_layers=int(c.num_hidden_layers),
        num_heads=heads,
        num_kv_heads=heads,
        head_size=hidden // heads,
        hidden_size=hidden,
        vocab_size=int(c.vocab_size),
        context_length=src.context_length,
    )


def _encoder_info(src: EncoderSource) -> EncoderInfo:
    c = src.model.config
    if src.task == "embed":
        return EncoderInfo(src.max_length, int(c.hidden_size), pooling=src.pooling, normalize=src.normalize)
    n = int(c.num_labels)
    id2label = {int(k): str(v) for k, v in (c.id2label or {}).items()}
    problem = c.problem_type or ("regression" if n == 1 else "single_label_classification")
    # transformers' text-classification pipeline: sigmoid for multi-label or one logit, else softmax
    score = "sigmoid" if problem == "multi_label_classification" or n == 1 else "softmax"
    labels = tuple(id2label.get(i, f"LABEL_{i}") for i in range(n))
    return EncoderInfo(src.max_length, n, labels=labels, problem_type=problem, score_function=score)


def _save_tokenizer(tokenizer, path: str) -> None:
    """The fast tokenizer's own tokenizer.json, without the truncation and padding it may carry: the
    runtime cuts texts at the manifest's max_length and pads each batch itself."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    backend.save(path)


def _summary(manifest: Manifest, where: str) -> str:
    v = manifest.validation
    agreement = (
        f"label agreement {v['label_agreement']:.1%}" if "label_agreement" in v else f"min cosine {v['min_cosine']:.6f}"
    )
    return (
        f"exported {manifest.architecture.model_type} for {manifest.task} ({manifest.graph.dtype}) to {where}: "
        f"max |Δ| {v['max_abs_diff']:.2e} (relative {v['max_rel_diff']:.2e}), {agreement}"
    )
