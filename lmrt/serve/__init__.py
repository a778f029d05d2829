"""``lmrt serve``: an OpenAI-compatible HTTP server over the runtime's Engine (the ``serve`` extra:
FastAPI and uvicorn; the runtime itself never imports them).

    from lmrt.serve import serve
    serve("models/smollm2", print, port=8000, slots=8)   # blocks until Ctrl-C / SIGTERM
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Callable

DEFAULT_CTX_SIZE = 2048
MAX_BODY_BYTES = 4 * 1024 * 1024


class ServeError(Exception):
    """The server cannot start; the message is one line meant for the user."""


def read_api_key(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            key = f.readline().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ServeError(f"cannot read the API key file {path}: {e}") from None
    if not key:
        raise ServeError(f"the API key file {path} is empty")
    return key


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0 picks a free one), or a one-line error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ServeError(f"cannot resolve --host {host}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def check_settings(model_dir: str, slots: int, ctx_size: int | None, max_queue: int, prefill_chunk: int, api_key: str | None):
    """(manifest, ctx_size) for serving ``model_dir`` with these settings, or a one-line ServeError;
    reads the manifest only, so it runs before anything slow."""
    from ..runtime import load_manifest

    manifest = load_manifest(model_dir)
    context = manifest.architecture.context_length
    ctx_size = min(context, DEFAULT_CTX_SIZE) if ctx_size is None else ctx_size
    if not 2 <= ctx_size <= context:
        raise ServeError(f"--ctx-size must be from 2 to the model's context ({context}), got {ctx_size}")
    for flag, value, least in (("--slots", slots, 1), ("--max-queue", max_queue, 0), ("--prefill-chunk", prefill_chunk, 1)):
        if value < least:
            raise ServeError(f"{flag} must be at least {least}, got {value}")
    if api_key is not None and not api_key.strip():
        raise ServeError("--api-key is empty")
    return manifest, ctx_size


def default_model_name(model_dir: str) -> str:
    """The model id clients send when --model-name is not given: the directory's name."""
    return os.path.basename(os.path.abspath(model_dir).rstrip(os.sep))


def serve(
    model_dir: str,
    report: Callable[[str], None],
    host: str = "127.0.0.1",
    port: int = 8000,
    slots: int = 4,
    ctx_size: int | None = None,
    api_key: str | None = None,
    provider: str = "auto",
    threads: int | None = None,
    max_queue: int = 64,
    prefill_chunk: int = 256,
    model_name: str | None = None,
) -> None:
    """Serve ``model_dir`` until interrupted; ``report`` prints a line when the port is bound and
    one saying where to connect once the model is loaded. Settings are checked, and the port bound,
    before the model loads; ``/health`` answers 503 until it has. A generation model is served by an
    Engine (completions and chat); an encoder (task embed or classify) by an Encoder (embeddings)."""
    try:
        import uvicorn

        from .app import ServerState, create_app
    except ImportError as e:
        raise ServeError(f"lmrt serve needs the serve extra: pip install 'lmrt[serve]' ({e})") from None
    from ..runtime import Encoder, Engine, Generator
    from ..runtime.errors import first_line

    manifest, ctx_size = check_settings(model_dir, slots, ctx_size, max_queue, prefill_chunk, api_key)
    generates = manifest.task == "generate"
    name = model_name or default_model_name(model_dir)
    sock = bind(host, port)
    state = ServerState(name, api_key, MAX_BODY_BYTES)
    server = uvicorn.Server(
        uvicorn.Config(create_app(state), log_level="warning", timeout_graceful_shutdown=5, access_log=False)
    )
    bound_host, bound_port = sock.getsockname()[:2]
    url = f"http://{bound_host if ':' not in bound_host else f'[{bound_host}]'}:{bound_port}"

    def load() -> None:
        try:
            if generates:
                gen = Generator(model_dir, provider=provider, threads=threads)
                engine = Engine(gen.model, slots=slots, ctx_size=ctx_size, max_queue=max_queue, prefill_chunk=prefill_chunk)
                how = f"provider {gen.provider}, {slots} slots x {ctx_size} tokens, KV cache {engine.kv_bytes / 1e6:.0f} MB reserved"
            else:
                encoder = Encoder(model_dir, provider=provider, threads=threads)
                how = f"provider {encoder.provider}, {manifest.task}: POST /v1/embeddings"
        except Exception as e:  # noqa: BLE001 - reported as one line, then the server stops
            state.load_error = first_line(e)
            server.should_exit = True
            return
        if generates:
            state.engine = engine
        else:
            state.encoder = encoder
        quantized = f", {manifest.quantization['name']}" if manifest.quantization else ""
        report(f"lmrt serve: {url}/v1  model {name} ({manifest.architecture.model_type}, {manifest.graph.dtype}{quantized}), {how}")

    report(f"lmrt serve: loading {model_dir} (listening on {url}; /health answers 503 until it is loaded)")
    threading.Thread(target=load, name="lmrt-load", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if state.engine is not None:
            state.engine.close()
    if state.load_error:
        raise ServeError(f"cannot load {model_dir}: {state.load_error}")
