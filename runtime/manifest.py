"""The model directory's manifest, ``lmrt.json``: the only contract between export and runtime.

Export writes it; the runtime reads nothing else about the model (never transformers' config files,
never a pickle). Everything is plain JSON so another language's runtime can read it too.

Every file the manifest names (fields marked ``FILE``) and every file the graph keeps weights in
must lie inside the model directory: ``load_manifest`` refuses absolute paths, ``..`` and links that
lead out, before anything is opened (``paths``). Each section is read into its dataclass with its
fields' types checked (``typed_json``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .adapter_manifest import Lora, read_lora
from .model_dir import MANIFEST_FILE, ManifestError
from .paths import FILE, check_external_data, check_file, contained_path, file_fields
from .state_spec import DECODINGS, StateSpec, read_state
from .tokenizer_file import load_tokenizer
from .typed_json import section, typed

__all__ = [  # the paths and the tokenizer are imported from here too
    "Architecture", "EncoderIO", "EncoderInfo", "FILE", "FORMAT_NAME", "FORMAT_VERSION", "Graph", "GraphIO",
    "MANIFEST_FILE", "Manifest", "ManifestError", "StateSpec", "TASKS", "TokenizerInfo", "contained_path", "file_fields",
    "load_manifest", "load_tokenizer", "require_task",
]  # fmt: skip

FORMAT_NAME = "lmrt-model"
FORMAT_VERSION = 2  # 2: in-place cache, logits_to_keep
# What a model directory's graph does. "generate": a decoder with a KV cache (the Generator);
# "embed" / "classify": an encoder whose graph returns one vector per text (the Encoder).
TASKS = ("generate", "embed", "classify")


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
                                                  then 0s (rows are padded on the right); "" when
                                                  the graph takes none (recurrent graphs)
             position_ids   int64 [batch, seq]     only when named (families with learned positions)
             logits_to_keep int64 []               logits are computed for the last this-many positions
             past key/value float [batch, kv_heads, capacity, head_size]   one pair per layer
    Outputs: logits         float [batch, logits_to_keep, vocab]
             present k/v    float [batch, kv_heads, capacity, head_size]
    The cache is updated in place: bind each present output to its past input's buffer, and the step
    writes the new keys and values of row b at positions [length_b, length_b + seq).
    Per-layer names are templates with ``{layer}``.
    ``scratch_positions`` (0 or 1): positions past [length_b, length_b + seq) that a step also writes
    (a scratch query row after the new ones), so the buffers hold that many more than the rows may
    fill. With 1, a pass over k new positions gives bit for bit the logits of k one-position steps.
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
    scratch_positions: int = 0


@dataclass(frozen=True)
class EncoderIO:
    """Names of an encoder graph's inputs and output (tasks "embed" and "classify").

    Inputs:  input_ids      int64 [batch, seq]
             attention_mask int64 [batch, seq]   1 for each token, then 0s (rows padded on the right)
             token_type_ids int64 [batch, seq]   only when named: 0 for a pair's first text, 1 for its second
    Output:  output         float32 [batch, dimension]   "embed": the sentence embedding, pooled
                                                         (and L2-normalized) inside the graph;
                                                         "classify": the logits
    """

    input_ids: str = "input_ids"
    attention_mask: str = "attention_mask"
    output: str = "embeddings"
    token_type_ids: str = ""  # "" when the graph takes none (type 0 is then inside the graph)


@dataclass(frozen=True)
class Graph:
    file: str = field(metadata=FILE)
    data_file: str | None = field(metadata=FILE)
    opset: int
    dtype: str
    io: GraphIO | EncoderIO = field(default_factory=GraphIO)  # EncoderIO for the encoder tasks
    # The decoding state, tensor by tensor (state_spec.py); empty: the KV cache the architecture describes
    state: tuple[StateSpec, ...] = ()
    # "step": each step runs the new tokens over the state; "window": no state, every step re-runs the
    # row's tokens (a module of one's own without a cache), up to context_length of them
    decoding: str = "step"


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
    lora: Lora | None = None  # the graph's LoRA inputs and the adapters held (adapter_manifest.py)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokenizer"]["eos_token_ids"] = list(self.tokenizer.eos_token_ids)
        for name, default in (("state", ()), ("decoding", "step")):
            if getattr(self.graph, name) == default:
                del d["graph"][name]  # a KV cache stepped over, as every manifest before said it
        for name in ("encoder", "lora"):
            if getattr(self, name) is None:
                del d[name]
        if self.encoder is not None:
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
        graph = dict(section(d, "graph"))
        io = typed(GraphIO if task == "generate" else EncoderIO, graph.pop("io", {}), "graph.io")
        if getattr(io, "scratch_positions", 0) not in (0, 1):
            raise ManifestError(f"malformed manifest: graph.io.scratch_positions must be 0 or 1, got {io.scratch_positions!r}")
        state = read_state(graph.pop("state", []))
        if graph.get("decoding", "step") not in DECODINGS:
            raise ManifestError(f"malformed manifest: graph.decoding must be one of {', '.join(DECODINGS)}, got {graph.get('decoding')!r}")
        stateless = state or graph.get("decoding") == "window"
        tok = dict(section(d, "tokenizer"))
        if isinstance(tok.get("eos_token_ids"), list):
            tok["eos_token_ids"] = tuple(tok["eos_token_ids"])
        architecture = typed(Architecture, section(d, "architecture"), "architecture")
        attention = ("num_layers", "num_heads", "num_kv_heads", "head_size")  # 0 for a module of one's own
        for f in fields(Architecture):
            value, least = getattr(architecture, f.name), 0 if f.default == 0 or (stateless and f.name in attention) else 1  # 0 is "none" where it is the default
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
            info = dict(section(d, "encoder"))
            if isinstance(info.get("labels"), list):
                info["labels"] = tuple(info["labels"])
            encoder = typed(EncoderInfo, info, "encoder")
        return cls(
            architecture=architecture,
            graph=typed(Graph, {**graph, "io": io, "state": state}, "graph"),
            tokenizer=typed(TokenizerInfo, tok, "tokenizer"),
            task=task,
            encoder=encoder,
            lora=read_lora(d.get("lora")),
            **extra,
        )

    def write(self, model_dir: str) -> str:
        """Write ``model_dir/lmrt.json``, replacing the old one at once (a reader sees one or the other)."""
        path = os.path.join(model_dir, MANIFEST_FILE)
        partial = f"{path}.partial-{os.getpid()}"
        with open(partial, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(partial, path)
        return path


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
        check_file(model_dir, relative, f"{name} in {MANIFEST_FILE}")
    check_external_data(model_dir, manifest.graph.file)
    return manifest
