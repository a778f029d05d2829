"""Execution-provider choice and ONNX Runtime session setup."""

from __future__ import annotations

import os
from typing import Any

from .manifest import MANIFEST_FILE

# Short names users type, mapped to ONNX Runtime's provider names. "auto" tries them in this order.
PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_SHORT = {v: k for k, v in PROVIDERS.items()}


class ProviderError(ValueError):
    """The requested execution provider is unknown or not offered by the installed onnxruntime."""


class GraphError(ValueError):
    """onnxruntime cannot load the graph, or the graph does not take and give what the manifest says."""


def import_onnxruntime():
    """Import onnxruntime, or explain which extra brings it."""
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(
            "lmrt needs onnxruntime: pip install 'lmrt[cpu]' (CPU), 'lmrt[gpu]' (CUDA / TensorRT), "
            "or install your platform's onnxruntime build (for example NVIDIA's Jetson wheel)"
        ) from None
    return onnxruntime


def available_providers() -> list[str]:
    """Short names of the providers the installed onnxruntime offers, fastest first."""
    offered = set(import_onnxruntime().get_available_providers())
    return [short for short, full in PROVIDERS.items() if full in offered]


def resolve_provider(requested: str, available: list[str]) -> str:
    """Pick one short provider name from ``requested`` ("auto", a short or a full name)."""
    name = requested.strip()
    name = _SHORT.get(name, name.lower())
    if name == "auto":
        for short in PROVIDERS:
            if short in available:
                return short
        raise ProviderError("onnxruntime offers none of the providers lmrt knows: " + ", ".join(PROVIDERS))
    if name not in PROVIDERS:
        raise ProviderError(
            f"unknown provider {requested!r}; choose one of: auto, " + ", ".join(PROVIDERS)
        )
    if name not in available:
        raise ProviderError(
            f"provider {name!r} is not available in the installed onnxruntime; available: "
            + ", ".join(["auto", *available])
        )
    return name


def trt_cache_dir(model_dir: str) -> str:
    """Where TensorRT keeps its compiled engines for this model (building one takes minutes)."""
    root = os.environ.get("LMRT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lmrt")
    key = os.path.basename(os.path.abspath(model_dir).rstrip(os.sep)) or "model"
    return os.path.join(root, "tensorrt", key)


def provider_chain(provider: str, model_dir: str, fp16: bool = False) -> list[Any]:
    """The providers list handed to InferenceSession: the chosen one, then fallbacks for nodes it
    cannot run (TensorRT → CUDA → CPU)."""
    chain: list[Any] = []
    if provider == "tensorrt":
        chain.append(
            (
                PROVIDERS["tensorrt"],
                {
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": trt_cache_dir(model_dir),
                    "trt_fp16_enable": fp16,
                },
            )
        )
    if provider in ("tensorrt", "cuda"):
        chain.append(PROVIDERS["cuda"])
    chain.append(PROVIDERS["cpu"])
    return chain


def create_session(
    model_path: str, provider: str, model_dir: str, threads: int | None = None, initializers: dict | None = None
):
    """An InferenceSession on ``provider`` (a resolved short name); returns (session, provider used).
    ``initializers``: {name: OrtValue} that replace the graph's initializers of those names (the
    caller keeps them alive as long as the session)."""
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    for name, value in (initializers or {}).items():
        opts.add_initializer(name, value)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= max_threads():
            raise ValueError(f"threads must be a positive integer, at most {max_threads()} (this machine's CPUs); got {threads!r}")
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    chain = provider_chain(provider, model_dir)
    if provider == "tensorrt":
        os.makedirs(trt_cache_dir(model_dir), exist_ok=True)
    try:
        session = ort.InferenceSession(model_path, sess_options=opts, providers=chain)
    except Exception as e:  # onnxruntime's own exception types (Fail, InvalidProtobuf, ...) derive from Exception
        raise GraphError(f"onnxruntime cannot load {model_path}: {_reason(e)}") from None
    # onnxruntime falls back silently when a GPU provider fails to load: report what it really uses.
    used = _SHORT.get(session.get_providers()[0], session.get_providers()[0])
    return session, used


def max_threads() -> int:
    """The most intra-op threads lmrt lets onnxruntime start: one per logical CPU."""
    return os.cpu_count() or 1


def _reason(e: Exception) -> str:
    """onnxruntime's message in one line, with the likely cause."""
    text = " ".join(str(e).split())
    if text.startswith("[ONNXRuntimeError]"):  # "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : message"
        text = text.split(" : ", 3)[-1]
    if "INVALID_PROTOBUF" in str(e):
        return f"{text} (the file is truncated or not an ONNX graph; export the model again)"
    if "External data" in text or "external data" in text:
        return f"{text} (its weights file is missing, truncated or outside the model directory)"
    return text


_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)"}


def expected_io(manifest) -> tuple[dict[str, tuple[str, dict[int, int]]], dict[str, tuple[str, dict[int, int]]]]:
    """The inputs and outputs the manifest promises: name -> (onnxruntime type, {axis: size})."""
    from .state_spec import state_of

    io, a = manifest.graph.io, manifest.architecture
    ids, logits = _ORT_TYPES["int64"], _ORT_TYPES.get(io.logits_dtype, io.logits_dtype)
    inputs = {io.input_ids: (ids, {})}
    for name in (io.attention_mask, io.position_ids, io.logits_to_keep):
        if name:
            inputs[name] = (ids, {})
    outputs = {io.logits: (logits, {2: a.vocab_size})}
    for spec in state_of(manifest):
        dtype = _ORT_TYPES.get(spec.dtype, spec.dtype)
        axes = [1, *range(3, len(spec.shape) + 2)] if spec.kind == "kv" else range(1, len(spec.shape) + 1)
        sizes = dict(zip(axes, spec.shape))
        inputs[spec.past], outputs[spec.present] = (dtype, sizes), (dtype, sizes)
    if manifest.lora is not None:  # the step's adapters' matrices and the places of its positions
        lora, weights = manifest.lora, _ORT_TYPES.get(manifest.graph.dtype, manifest.graph.dtype)
        for p in lora.inputs:
            inputs[p.a], inputs[p.b] = (weights, {1: p.in_features}), (weights, {2: p.out_features})
        inputs[lora.index], inputs[lora.valid], inputs[lora.back] = (ids, {}), (weights, {2: 1}), (ids, {2: 2})
    return inputs, outputs


def check_graph_io(session, manifest, model_path: str) -> None:
    """GraphError unless the session's graph takes exactly the inputs the manifest names and gives
    its outputs, with the manifest's types and sizes: a graph copied in from another model fails
    here, not halfway through generating."""
    inputs, outputs = expected_io(manifest)
    problems = []
    for kind, expected, actual in (("input", inputs, session.get_inputs()), ("output", outputs, session.get_outputs())):
        found = {arg.name: arg for arg in actual}
        problems += [f"{kind} {name!r} is missing" for name in expected if name not in found]
        if kind == "input":
            problems += [f"it takes an input {name!r} the manifest does not name" for name in found if name not in expected]
        for name, (dtype, sizes) in expected.items():
            arg = found.get(name)
            if arg is None:
                continue
            if arg.type != dtype:
                problems.append(f"{kind} {name!r} is {arg.type}, not {dtype}")
            shape = arg.shape if isinstance(arg.shape, (list, tuple)) else []
            for axis, size in sizes.items():
                if axis < len(shape) and isinstance(shape[axis], int) and shape[axis] != size:
                    problems.append(f"{kind} {name!r} has size {shape[axis]} on axis {axis}, not {size}")
    if problems:
        more = f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else ""
        raise GraphError(
            f"{model_path} does not match {MANIFEST_FILE}: {problems[0]}{more}; the graph and the manifest do not "
            "belong together (not one lmrt export), export the model again"
        )
