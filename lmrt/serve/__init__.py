"""``lmrt serve``: an OpenAI-compatible HTTP server over the runtime's Engine (the ``serve`` extra:
FastAPI and uvicorn; the runtime itself never imports them).

    from lmrt.serve import ServeSettings, serve
    serve(ServeSettings(model_dir="models/smollm2", port=8000, slots=8), print)   # blocks until Ctrl-C / SIGTERM
"""

from __future__ import annotations

import socket
import threading
from typing import Callable

from .errors import ServeError
from .settings import ServeSettings, default_model_name

MAX_BODY_BYTES = 4 * 1024 * 1024


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


def serve(settings: ServeSettings, report: Callable[[str], None]) -> None:
    """Serve ``settings.model_dir`` until interrupted; ``report`` prints a line when the port is bound
    and one saying where to connect once the model is loaded. The settings were checked when they
    were built and the port is bound before the model loads; ``/health`` answers 503 until it has. A generation model is served by an
    Engine (completions and chat); an encoder (task embed or classify) by an Encoder (embeddings)."""
    try:
        import uvicorn

        from .app import ServerState, create_app
        from .response_store import ResponseStore
        from .protocol import MAX_HEAD_BYTES, JSONErrorsProtocol, long_urls_refused
    except ImportError as e:
        raise ServeError(f"lmrt serve needs the serve extra: pip install 'lmrt[serve]' ({e})") from None
    from ..precision import precision
    from ..runtime import Encoder, Engine, LoadedModel
    from ..runtime.errors import first_line
    from ..state_size import reserved_line

    manifest = settings.manifest
    generates = manifest.task == "generate"
    sock = bind(settings.host, settings.port)
    state = ServerState(settings.model_name, settings.api_key, MAX_BODY_BYTES, settings.body_timeout,
                        response_store=ResponseStore(settings.stored_responses),
                        allow_adapter_loading=settings.allow_adapter_loading, max_adapters=settings.max_adapters)
    server = uvicorn.Server(
        uvicorn.Config(
            long_urls_refused(create_app(state)), log_level="warning", timeout_graceful_shutdown=5, access_log=False,
            http=JSONErrorsProtocol, h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        )  # fmt: skip
    )
    bound_host, bound_port = sock.getsockname()[:2]
    url = f"http://{bound_host if ':' not in bound_host else f'[{bound_host}]'}:{bound_port}"

    def load() -> None:
        try:
            if generates:
                model = LoadedModel(settings.model_dir, provider=settings.provider, threads=settings.threads)
                engine = Engine(model, settings.engine_settings())
                how = (f"provider {model.provider}, {settings.slots} slots x {settings.ctx_size} tokens, "
                       f"{reserved_line(model.state_specs, engine.slots, engine.ctx_size)}")  # fmt: skip
            else:
                encoder = Encoder(settings.model_dir, provider=settings.provider, threads=settings.threads)
                how = f"provider {encoder.provider}, {manifest.task}: POST /v1/embeddings"
        except Exception as e:  # noqa: BLE001 - reported as one line, then the server stops
            state.load_error = first_line(e)
            server.should_exit = True
            return
        if generates:
            state.engine = engine
        else:
            state.encoder = encoder
        model = f"{settings.model_name} ({manifest.architecture.model_type}, {precision(manifest)})"
        report(f"lmrt serve: {url}/v1  model {model}, {how}")

    report(f"lmrt serve: loading {settings.model_dir} (listening on {url}; /health answers 503 until it is loaded)")
    threading.Thread(target=load, name="lmrt-load", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if state.engine is not None:
            state.engine.close()
    if state.load_error:
        raise ServeError(f"cannot load {settings.model_dir}: {state.load_error}")


__all__ = ["MAX_BODY_BYTES", "ServeError", "ServeSettings", "bind", "default_model_name", "read_api_key", "serve"]
