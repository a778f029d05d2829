"""A source's files, read before anything heavy is imported: from a local directory, or from a
Hugging Face Hub id's files when the hub (or its local cache) has them."""

from __future__ import annotations

import json
import os

from ..runtime.errors import first_line
from .errors import ExportError


def in_hub_cache(repo_id: str) -> bool:
    """Whether the hub id's config is already in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection attempt, instead of transformers' minute of retries when offline."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_file(repo_id: str, name: str) -> str | None:
    """The local path of the hub repository's file ``name``; None when it cannot be had (no such
    file or repository, offline): loading the source reports the real problem."""
    try:
        from huggingface_hub import hf_hub_download

        if not (in_hub_cache(repo_id) or hub_reachable()):
            return None
        return hf_hub_download(repo_id, name)
    except Exception:
        return None


def load_json(path: str, what: str):
    """The JSON value in the file ``path``; ``what`` names the file in the error."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read {what}: {first_line(e)}") from None


def read_json(source: str, name: str) -> dict | list | None:
    """``name`` from a local directory, or from a hub id's files; None when there is no such file
    (a .gguf file or another local file has none)."""
    if os.path.isdir(source):
        path = os.path.join(source, name)
    elif source.lower().endswith(".gguf") or os.path.exists(source):
        return None
    else:
        path = hub_file(source, name)
    if path is None or not os.path.isfile(path):
        return None
    return load_json(path, f"{name} of {source}")
