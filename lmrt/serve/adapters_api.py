"""vLLM's routes that change the LoRA adapters while serving: ``POST /v1/load_lora_adapter``
({"lora_name", "lora_path"}) and ``POST /v1/unload_lora_adapter`` ({"lora_name"}), answered, as
vLLM answers them, with a line of text.

Both are off unless ``lmrt serve --allow-adapter-loading`` (403 otherwise): loading reads a PEFT
directory at whatever path the request names. Without ``lora_path`` the name is one of the model
directory's adapters (one unloaded earlier). A loaded adapter is held in memory only: nothing is
written to the model directory, and the server starts next time with the adapters its manifest
lists. The change itself is made on the engine's thread, between two steps (``Engine.load_adapter``).
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from ..runtime import Engine
from ..runtime.adapter_manifest import ADAPTER_NAME
from ..runtime.adapters import AdapterChangeError, read_adapter
from ..runtime.errors import first_line
from .errors import APIError
from .options import read_value
from .requests import check_fields

# HTTP status of each reason an engine refuses a change for
REFUSED = {"held": (400, "adapter_already_loaded"), "unknown": (404, "adapter_not_found"),
           "in_use": (409, "adapter_in_use"), "full": (400, "too_many_adapters")}  # fmt: skip


def register(app: FastAPI, state, engine_for: Callable[[Request], Engine], json_body: Callable[[Request], Awaitable[Any]]) -> None:
    """The two routes on ``app``: ``state`` is the app's ServerState, ``engine_for`` authorizes a
    request and gives the engine (or refuses), ``json_body`` reads its body."""

    async def adapter_request(request: Request, fields: set[str]) -> tuple[Engine, dict, str]:
        engine = engine_for(request)
        if not state.allow_adapter_loading:
            raise APIError(403, "loading and unloading LoRA adapters is off: start lmrt serve with --allow-adapter-loading",
                           code="adapter_loading_disabled")  # fmt: skip
        if engine.model.adapters is None:
            raise APIError(400, "this model's graph takes no LoRA adapters: add one once with `lmrt adapter MODEL_DIR PEFT_DIR "
                           "--name NAME` (that rewrites the graph), then serve it again", code="adapters_unsupported")  # fmt: skip
        body = await json_body(request)
        check_fields(body, fields, ("lora_name",))
        name = read_value(body, "lora_name", lambda v: isinstance(v, str), "a string")
        if not ADAPTER_NAME.fullmatch(name):
            raise APIError(400, "'lora_name' must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit",
                           "lora_name")  # fmt: skip
        return engine, body, name

    async def changed(future) -> None:
        try:
            await asyncio.wrap_future(future)
        except AdapterChangeError as e:
            status, code = REFUSED[e.reason]
            raise APIError(status, str(e), "lora_name", code) from None
        except ValueError as e:  # matrices that do not fit the graph
            raise APIError(400, first_line(e), "lora_name", "invalid_adapter") from None

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> PlainTextResponse:
        engine, body, name = await adapter_request(request, {"lora_name", "lora_path"})
        path = read_value(body, "lora_path", lambda v: isinstance(v, str) and v != "", "a directory's path")
        model = engine.model
        if name in model.adapter_names:
            raise APIError(400, f"the adapter '{name}' is already loaded", "lora_name", "adapter_already_loaded")
        if path is None:
            entry = model.manifest.lora.entry(name)
            if entry is None:
                raise APIError(404, f"the model directory has no adapter '{name}'; give 'lora_path', a PEFT adapter's directory",
                               "lora_name", "adapter_not_found")  # fmt: skip
            work = asyncio.to_thread(lambda: (read_adapter(model.model_dir, entry, model.manifest.lora), entry.scale))
        else:
            work = asyncio.to_thread(_read_peft, model, path)
        try:
            matrices, scale = await work
        except Exception as e:  # noqa: BLE001 - the adapter refused (AdapterError) or unreadable: one line
            raise APIError(400, first_line(e), "lora_path" if path else "lora_name", "invalid_adapter") from None
        await changed(engine.load_adapter(name, matrices, scale, state.max_adapters))
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> PlainTextResponse:
        engine, _body, name = await adapter_request(request, {"lora_name"})
        await changed(engine.unload_adapter(name))
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def _read_peft(model, path: str):
    """(matrices, scale) of the PEFT adapter at ``path`` for ``model``'s graph: add_adapter's checks."""
    try:
        from ..export.adapters.pipeline import peft_matrices
    except ImportError as e:
        raise RuntimeError(f"loading a PEFT directory needs the export extra: pip install 'lmrt[export]' ({e})") from None
    return peft_matrices(model.model_dir, model.manifest, path)
