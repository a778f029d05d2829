"""Execution-provider choice and ONNX Runtime session setup."""

from __future__ import annotations

import os
from typing import Any

# Short names users type, mapped to ONNX Runtime's provider names. "auto" tries them in this order.
PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_SHORT = {v: k for k, v in PROVIDERS.items()}


class ProviderError(ValueError):
    """The requested execution provider is unknown or not offered by the installed onnxruntime."""


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


def create_session(model_path: str, provider: str, model_dir: str, threads: int | None = None):
    """An InferenceSession on ``provider`` (a resolved short name); returns (session, provider used)."""
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads}")
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    chain = provider_chain(provider, model_dir)
    if provider == "tensorrt":
        os.makedirs(trt_cache_dir(model_dir), exist_ok=True)
    session = ort.InferenceSession(model_path, sess_options=opts, providers=chain)
    # onnxruntime falls back silently when a GPU provider fails to load: report what it really uses.
    used = _SHORT.get(session.get_providers()[0], session.get_providers()[0])
    return session, used
