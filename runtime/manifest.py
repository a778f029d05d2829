"""The model directory's manifest, ``lmrt.json``: the only contract between export and runtime.

Export writes it; the runtime reads nothing else about the model (never transformers' config files,
never a pickle). Everything is plain JSON so another language's runtime can read it too.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

MANIFEST_FILE = "lmrt.json"
FORMAT_NAME = "lmrt-model"
FORMAT_VERSION = 2  # 2: in-place cache, logits_to_keep
# What a model directory's graph does. "generate": a decoder with a KV cache (the Generator);
# "embed" / "classify": an encoder whose graph returns one vector per text (the Encoder).
TASKS = ("generate", "embed", "classify")


class ManifestError(ValueError):
    """The model directory is missing, incomplete or of an unsupported format."""


@dataclass(frozen=True)
class Architecture:
    family: str  # registry key of the graph builder: "gpt2", "llama"
    model_type: str  # the source's own model type: "llama", "qwen2", "mistral", ...
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    hidden_size: int
    vocab_size: int
    context_length: int


@dataclass(frozen=True)
class GraphIO:
    """Names and dtypes of the graph's inputs and outputs.

    Inputs:  input_ids      int64 [batch, seq]
             attention_mask int64 [batch, total]   row b: 1 for each of its cached + new positions,
                                                  then 0s (rows are padded on the right)
             position_ids   int64 [batch, seq]     only when named (families with learned positions)
             logits_to_keep int64 []               logits are computed for the last this-many positions
             past key/value float [batch, kv_heads, capacity, head_size]   one pair per layer
    Outputs: logits         float [batch, logits_to_keep, vocab]
             present k/v    float [batch, kv_heads, capacity, head_size]
    The cache is updated in place: bind each present output to its past input's buffer, and the step
    writes the new keys and values of row b at positions [length_b, length_b + seq).
    Per-layer names are templates with ``{layer}``.
    """

    input_ids: str = "input_ids"
    attention_mask: str = "attention_mask"
    position_ids: str = "position_ids"  # "" when the graph takes none
    logits_to_keep: str = "logits_to_keep"
    past_key: str = "past_key_values.{layer}.key"
    past_value: str = "past_key_values.{layer}.value"
    logits: str = "logits"
    present_key: str = "present.{layer}.key"
    present_value: str = "present.{layer}.value"
    kv_dtype: str = "float32"
    logits_dtype: str = "float32"


@dataclass(frozen=True)
class EncoderIO:
    """Names of an encoder graph's inputs and output (tasks "embed" and "classify").

    Inputs:  input_ids      int64 [batch, seq]
             attention_mask int64 [batch, seq]   1 for each token, then 0s (rows padded on the right)
    Output:  output         float32 [batch, dimension]   "embed": the sentence embedding, pooled
                                                         (and L2-normalized) inside the graph;
                                                         "classify": the logits
    """

    input_ids: str = "input_ids"
    attention_mask: str = "attention_mask"
    output: str = "embeddings"


@dataclass(frozen=True)
class Graph:
    file: str
    data_file: str | None
    opset: int
    dtype: str
    io: GraphIO | EncoderIO = field(default_factory=GraphIO)  # EncoderIO for the encoder tasks


@dataclass(frozen=True)
class EncoderInfo:
    """What an encoder's output means and how texts are prepared for it."""

    max_length: int  # tokens per text, special tokens included; longer texts are cut (or refused)
    dimension: int  # size of the output vector: the embedding size, or the number of labels
    pooling: str = ""  # embed: "mean", "cls", "max" or "mean_sqrt_len" over the tokens, in the graph
    normalize: bool = False  # embed: the graph L2-normalizes each embedding
    labels: tuple[str, ...] = ()  # classify: the label of each logit, in order
    problem_type: str = ""  # classify: single_label_classification, multi_label_classification or regression
    score_function: str = ""  # classify: "softmax" or "sigmoid", turning logits into scores


@dataclass(frozen=True)
class TokenizerInfo:
    file: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None


@dataclass(frozen=True)
class Manifest:
    architecture: Architecture
    graph: Graph
    tokenizer: TokenizerInfo
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)  # scheme and parameters; empty for float graphs
    quality: dict[str, Any] = field(default_factory=dict)  # the quantization gate's measurements
    task: str = "generate"  # one of TASKS; manifests written before encoders have none: "generate"
    encoder: EncoderInfo | None = None  # the encoder tasks only
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokenizer"]["eos_token_ids"] = list(self.tokenizer.eos_token_ids)
        if self.encoder is None:
            del d["encoder"]
        else:
            d["encoder"]["labels"] = list(self.encoder.labels)
        # Put the format and the task first so a reader sees what the file is at a glance.
        head = {"format": d.pop("format"), "format_version": d.pop("format_version"), "task": d.pop("task")}
        return {**head, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        if d.get("format") != FORMAT_NAME:
            raise ManifestError(f"not an lmrt manifest (format is {d.get('format')!r})")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"manifest format version {version} is not supported by this lmrt "
                f"(it reads version {FORMAT_VERSION}); re-export the model or upgrade lmrt"
            )
        task = d.get("task", "generate")
        if task not in TASKS:
            raise ManifestError(f"unknown task {task!r} in the manifest; this lmrt knows {', '.join(TASKS)}")
        try:
            graph = dict(d["graph"])
            io = (GraphIO if task == "generate" else EncoderIO)(**graph.pop("io", {}))
            tok = dict(d["tokenizer"])
            tok["eos_token_ids"] = tuple(tok.get("eos_token_ids") or ())
            return cls(
                architecture=Architecture(**d["architecture"]),
                graph=Graph(io=io, **graph),
                tokenizer=TokenizerInfo(**tok),
                generation_defaults=dict(d.get("generation_defaults") or {}),
                provenance=dict(d.get("provenance") or {}),
                validation=dict(d.get("validation") or {}),
                quantization=dict(d.get("quantization") or {}),
                quality=dict(d.get("quality") or {}),
                task=task,
                encoder=_encoder_info(d.get("encoder")) if task != "generate" else None,
            )
        except (KeyError, TypeError) as e:
            raise ManifestError(f"malformed manifest: {e}") from None

    def write(self, model_dir: str) -> str:
        path = os.path.join(model_dir, MANIFEST_FILE)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, ensure_ascii=False)
            f.write("\n")
        return path


def _encoder_info(d: dict[str, Any] | None) -> EncoderInfo:
    if not d:
        raise KeyError("encoder")
    return EncoderInfo(**{**d, "labels": tuple(d.get("labels") or ())})


def require_task(manifest: Manifest, tasks: tuple[str, ...], model_dir: str) -> None:
    """Refuse, in one line, a model directory whose task the caller cannot run."""
    if manifest.task in tasks:
        return
    use = "runtime.Generator or `lmrt generate`" if manifest.task == "generate" else f"runtime.Encoder or `lmrt {manifest.task}`"
    raise ManifestError(f"{model_dir} holds a model for the task {manifest.task!r}; load it with {use}")


def load_manifest(model_dir: str) -> Manifest:
    """Read ``model_dir/lmrt.json``, raising ManifestError with a one-line reason."""
    if not os.path.isdir(model_dir):
        raise ManifestError(f"model directory not found: {model_dir}")
    path = os.path.join(model_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise ManifestError(f"{model_dir} has no {MANIFEST_FILE}; is it a directory written by `lmrt export`?")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestError(f"cannot read {path}: {e}") from None
    manifest = Manifest.from_dict(data)
    for name in (manifest.graph.file, manifest.tokenizer.file):
        if not os.path.isfile(os.path.join(model_dir, name)):
            raise ManifestError(f"{model_dir} is incomplete: {name} is missing")
    return manifest
