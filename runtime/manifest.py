"""The model directory's manifest, ``lmrt.json``: the only contract between export and runtime.

Export writes it; the runtime reads nothing else about the model (never transformers' config files,
never a pickle). Everything is plain JSON so another language's runtime can read it too.

Every file the manifest names (fields marked ``FILE``) and every file the graph keeps weights in
must lie inside the model directory: ``load_manifest`` refuses absolute paths, ``..`` and links that
lead out, before anything is opened.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

from .errors import first_line
from .model_dir import MANIFEST_FILE
from .onnx_wire import OnnxFileError, external_data

FORMAT_NAME = "lmrt-model"
FORMAT_VERSION = 2  # 2: in-place cache, logits_to_keep
# What a model directory's graph does. "generate": a decoder with a KV cache (the Generator);
# "embed" / "classify": an encoder whose graph returns one vector per text (the Encoder).
TASKS = ("generate", "embed", "classify")


class ManifestError(ValueError):
    """The model directory is missing, incomplete, of an unsupported format, or names files outside
    itself."""


FILE = {"file": True}  # metadata of a field holding a path inside the model directory


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
    # LongRoPE: while a row holds at most this many positions the graph rotates with the short-context
    # table, beyond it with the long one. Keys cached before were rotated with the short table, so a
    # row that grows past it is fed again from its first token, as transformers does (0: no switch).
    rotary_switch_after: int = 0


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
    file: str = field(metadata=FILE)
    data_file: str | None = field(metadata=FILE)
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
    file: str = field(metadata=FILE)
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
    requires: dict[str, Any] = field(default_factory=dict)  # the oldest onnxruntime that runs the graph (compat.py)
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
        if not isinstance(d, dict):
            raise ManifestError(f"not an lmrt manifest (a JSON {type(d).__name__}, not an object)")
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
        graph = dict(_section(d, "graph"))
        io = _typed(GraphIO if task == "generate" else EncoderIO, graph.pop("io", {}), "graph.io")
        tok = dict(_section(d, "tokenizer"))
        if isinstance(tok.get("eos_token_ids"), list):
            tok["eos_token_ids"] = tuple(tok["eos_token_ids"])
        architecture = _typed(Architecture, _section(d, "architecture"), "architecture")
        for f in fields(Architecture):
            value, least = getattr(architecture, f.name), 0 if f.default == 0 else 1  # 0 is "none" where it is the default
            if isinstance(value, int) and value < least:
                raise ManifestError(f"malformed manifest: architecture.{f.name} must be at least {least}, got {value}")
        extra = {}
        for name in ("generation_defaults", "provenance", "validation", "quantization", "quality", "requires"):
            value = d.get(name) or {}
            if not isinstance(value, dict):
                raise ManifestError(f"malformed manifest: {name} must be an object")
            extra[name] = dict(value)
        encoder = None
        if task != "generate":
            info = dict(_section(d, "encoder"))
            if isinstance(info.get("labels"), list):
                info["labels"] = tuple(info["labels"])
            encoder = _typed(EncoderInfo, info, "encoder")
        return cls(
            architecture=architecture,
            graph=_typed(Graph, {**graph, "io": io}, "graph"),
            tokenizer=_typed(TokenizerInfo, tok, "tokenizer"),
            task=task,
            encoder=encoder,
            **extra,
        )

    def write(self, model_dir: str) -> str:
        path = os.path.join(model_dir, MANIFEST_FILE)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, ensure_ascii=False)
            f.write("\n")
        return path


_TYPES = {  # a field's annotation -> the JSON values it takes
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "int | None": lambda v: v is None or _TYPES["int"](v),
    "str | None": lambda v: v is None or isinstance(v, str),
    "tuple[int, ...]": lambda v: isinstance(v, tuple) and all(_TYPES["int"](x) for x in v),
    "tuple[str, ...]": lambda v: isinstance(v, tuple) and all(isinstance(x, str) for x in v),
    "bool": lambda v: isinstance(v, bool),
}


def _section(d: dict[str, Any], name: str) -> dict[str, Any]:
    value = d.get(name)
    if not isinstance(value, dict):
        raise ManifestError(f"malformed manifest: {name} is {'missing' if value is None else 'not an object'}")
    return value


def _typed(cls, data: Any, section: str):
    """``cls(**data)`` once every field is known, present (or defaulted) and of its declared type."""
    if not isinstance(data, dict):
        raise ManifestError(f"malformed manifest: {section} is not an object")
    known = {f.name: f for f in fields(cls)}
    for name, value in data.items():
        if name not in known:
            raise ManifestError(f"malformed manifest: {section} has an unknown field {name!r}")
        check = _TYPES.get(known[name].type)
        if check is not None and not check(value):
            raise ManifestError(f"malformed manifest: {section}.{name} must be {known[name].type}, got {value!r}")
    try:
        return cls(**data)
    except TypeError as e:  # a required field is missing
        raise ManifestError(f"malformed manifest: {section}: {e}") from None


def file_fields(manifest: Manifest) -> list[tuple[str, str]]:
    """(dotted field name, path) of every file the manifest names."""
    out = []

    def walk(obj, prefix: str) -> None:
        for f in fields(obj):
            value = getattr(obj, f.name)
            if f.metadata.get("file") and value is not None:
                out.append((f"{prefix}{f.name}", value))
            elif is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")

    walk(manifest, "")
    return out


def contained_path(model_dir: str, relative: str, what: str) -> str:
    """``model_dir/relative`` once it is known to stay inside ``model_dir`` (no absolute path, no
    ``..``, no link leading out); ``what`` names the path in errors ("graph.file in lmrt.json")."""
    refuse = f"{model_dir}: {what} is {{}}; lmrt reads files inside the model directory only"
    if not relative:
        raise ManifestError(f"{model_dir}: {what} is empty")
    if os.path.isabs(relative) or relative.startswith(("/", "\\")) or os.path.splitdrive(relative)[0]:
        raise ManifestError(refuse.format(f"an absolute path ({relative})"))
    if ".." in relative.replace("\\", "/").split("/"):
        raise ManifestError(refuse.format(f"{relative}, which leads out with '..'"))
    root = os.path.realpath(model_dir)
    path = os.path.join(model_dir, relative)
    real = os.path.realpath(path)
    if real == root:
        raise ManifestError(refuse.format(f"{relative}, the model directory itself"))
    if not real.startswith(root.rstrip(os.sep) + os.sep):
        raise ManifestError(refuse.format(f"{relative}, which resolves (through a link) to {real}"))
    return path


def _check_file(model_dir: str, relative: str, what: str) -> str:
    path = contained_path(model_dir, relative, what)
    if not os.path.exists(path):
        raise ManifestError(f"{model_dir} is incomplete: {relative} is missing ({what})")
    if not os.path.isfile(path):
        raise ManifestError(f"{model_dir} is damaged: {relative} is not a file ({what})")
    return path


def _check_external_data(model_dir: str, graph_relative: str) -> None:
    """The graph's weight files: inside the model directory, present, and long enough."""
    graph_path = os.path.join(model_dir, graph_relative)
    try:
        refs = external_data(graph_path)
    except OnnxFileError as e:
        raise ManifestError(f"{graph_path} is {e}: not a complete ONNX graph; export the model again") from None
    except OSError as e:
        raise ManifestError(f"cannot read {graph_path} ({e.strerror})") from None
    needed: dict[str, tuple[int, str]] = {}  # location -> (bytes needed, a tensor stored there)
    for ref in refs:
        end = ref.offset + (ref.length or 0)
        needed[ref.location] = max(needed.get(ref.location, (0, ref.tensor)), (end, ref.tensor))
    base = os.path.dirname(graph_relative)
    for location, (end, tensor) in needed.items():
        what = f"the external data of tensor {tensor!r} in {graph_relative}"
        path = _check_file(model_dir, os.path.join(base, location) if base else location, what)
        size = os.path.getsize(path)
        if size < end:
            raise ManifestError(
                f"{path} is truncated: {graph_relative} needs {end} bytes of it, it has {size}; export the model again"
            )


def require_task(manifest: Manifest, tasks: tuple[str, ...], model_dir: str) -> None:
    """Refuse, in one line, a model directory whose task the caller cannot run."""
    if manifest.task in tasks:
        return
    use = "runtime.Generator or `lmrt generate`" if manifest.task == "generate" else f"runtime.Encoder or `lmrt {manifest.task}`"
    raise ManifestError(f"{model_dir} holds a model for the task {manifest.task!r}; load it with {use}")


def load_manifest(model_dir: str) -> Manifest:
    """Read ``model_dir/lmrt.json`` and check the files it names, raising ManifestError with a
    one-line reason: a missing, damaged or truncated file, or one outside the model directory."""
    model_dir = os.fspath(model_dir)
    if not model_dir:
        raise ManifestError("the model directory is an empty path")
    if not os.path.isdir(model_dir):
        if os.path.exists(model_dir):
            raise ManifestError(f"{model_dir} is a file; give the model directory that holds {MANIFEST_FILE}")
        raise ManifestError(f"model directory not found: {model_dir}")
    path = os.path.join(model_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise ManifestError(f"{model_dir} has no {MANIFEST_FILE}; is it a directory written by `lmrt export`?")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ManifestError(f"cannot read {path} ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON ({e}); export the model again") from None
    try:
        manifest = Manifest.from_dict(data)
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}") from None
    for name, relative in file_fields(manifest):
        _check_file(model_dir, relative, f"{name} in {MANIFEST_FILE}")
    _check_external_data(model_dir, manifest.graph.file)
    return manifest


def load_tokenizer(model_dir: str, manifest: Manifest):
    """The model's ``tokenizers.Tokenizer``, or ManifestError naming the file when it cannot be read."""
    from tokenizers import Tokenizer

    path = contained_path(model_dir, manifest.tokenizer.file, f"tokenizer.file in {MANIFEST_FILE}")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises plain Exception for a file it cannot parse
        raise ManifestError(
            f"{path} is not a tokenizer the tokenizers library can read ({first_line(e)}); export the model again"
        ) from None
