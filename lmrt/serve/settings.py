"""ServeSettings: everything ``lmrt serve`` runs with, in one frozen object: where it listens, who
may call it, which model under which name, how the model is run, and the engine's sizing.

The sizing is EngineSettings' own fields (inherited, with their defaults, help and flags); each
other field's metadata holds its help text and command-line flag too, and ``lmrt serve``'s options
are built from them. ``provider`` and ``threads`` are the --provider / --threads of every command
that loads a model.

A ServeSettings is checked when it is built: the model's manifest is read (nothing is loaded), every
setting is checked against it, with one-line ServeErrors that name the flags, and the defaults that
depend on the model are resolved (``ctx_size``, ``model_name``). ``serve()`` and every Ray replica
take it as it is.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields

from ..runtime.checks import is_int, is_number
from ..runtime.engine_settings import EngineSettings
from ..runtime.manifest import Manifest, load_manifest
from .errors import ServeError

MAX_PORT = 65535

def default_model_name(model_dir: str) -> str:
    """The model id clients send when --model-name is not given: the directory's name."""
    return os.path.basename(os.path.abspath(model_dir).rstrip(os.sep))


@dataclass(frozen=True, kw_only=True)
class ServeSettings(EngineSettings):
    """What ``lmrt serve`` runs with; built with keywords: ``ServeSettings(model_dir=..., slots=8)``."""

    model_dir: str
    host: str = field(default="127.0.0.1", metadata={"flag": "--host", "help": "Address to listen on (0.0.0.0: every interface)."})
    port: int = field(default=8000, metadata={"flag": "--port", "help": "Port to listen on, 0 to 65535 (0: any free one)."})
    api_key: str | None = field(
        default=None, repr=False, metadata={"flag": "--api-key", "help": "Require 'Authorization: Bearer KEY' on every route but /health."}
    )
    model_name: str | None = field(
        default=None, metadata={"flag": "--model-name", "help": "The model id clients send [default: the directory's name]."}
    )
    provider: str = field(default="auto", metadata={"flag": "--provider", "help": "auto, tensorrt, cuda or cpu."})
    threads: int | None = field(
        default=None, metadata={"flag": "--threads", "help": "CPU threads (default: onnxruntime's choice, the physical cores)."}
    )
    stored_responses: int = field(
        default=256, metadata={"flag": "--stored-responses", "help": "Answers of POST /v1/responses kept for previous_response_id (0: none)."}
    )
    body_timeout: float = field(
        default=30.0, metadata={"flag": "--body-timeout", "help": "Seconds a request's body may take to arrive; past that: 408."}
    )
    allow_adapter_loading: bool = field(
        default=False, metadata={"flag": "--allow-adapter-loading", "help": "Serve POST /v1/load_lora_adapter and "
                                 "/v1/unload_lora_adapter (loading reads a PEFT directory at a path the request names)."},
    )  # fmt: skip
    max_adapters: int | None = field(
        default=None, metadata={"flag": "--max-adapters", "help": "The most LoRA adapters held at once [default: no bound]."}
    )
    manifest: Manifest = field(init=False, repr=False, compare=False)  # read from model_dir when built

    def __post_init__(self) -> None:
        manifest = load_manifest(self.model_dir)
        context = manifest.architecture.context_length
        if self.ctx_size is None or is_int(self.ctx_size):
            try:
                object.__setattr__(self, "ctx_size", self.resolved_ctx_size(context))
            except ValueError:
                shown = context if self.ctx_size is None else self.ctx_size  # the default fails for a context under 2 only
                raise ServeError(f"{self.flag('ctx_size')} must be from 2 to the model's context ({context}), got {shown}") from None
        for name in ("slots", "max_queue", "prefill_chunk"):
            value, least = getattr(self, name), self.least(name)
            if is_int(value) and value < least:
                raise ServeError(f"{self.flag(name)} must be at least {least}, got {value}")
        if not is_int(self.stored_responses) or self.stored_responses < 0:
            raise ServeError(f"{self.flag('stored_responses')} must be an integer of at least 0, got {self.stored_responses}")
        if not (is_int(self.port) and 0 <= self.port <= MAX_PORT):
            raise ServeError(f"{self.flag('port')} must be from 0 to {MAX_PORT} (0: any free port), got {self.port}")
        if not (is_number(self.body_timeout) and 0 < self.body_timeout < math.inf):
            raise ServeError(f"{self.flag('body_timeout')} must be a number of seconds above 0, got {self.body_timeout}")
        if self.max_adapters is not None:
            held = len(manifest.lora.adapters) if manifest.lora is not None else 0
            if not is_int(self.max_adapters) or self.max_adapters < 1:
                raise ServeError(f"{self.flag('max_adapters')} must be an integer of at least 1, got {self.max_adapters}")
            if held > self.max_adapters:
                raise ServeError(f"{self.model_dir} holds {held} LoRA adapters, more than {self.flag('max_adapters')} {self.max_adapters}")
        if self.api_key is not None and not self.api_key.strip():
            raise ServeError(f"{self.flag('api_key')} is empty")
        super().__post_init__()  # what is not an integer at all
        object.__setattr__(self, "manifest", manifest)
        object.__setattr__(self, "model_name", self.model_name or default_model_name(self.model_dir))

    @classmethod
    def flag(cls, name: str) -> str:
        """The command-line flag of the field ``name`` ("--ctx-size")."""
        return next(f.metadata["flag"] for f in fields(cls) if f.name == name)

    def engine_settings(self) -> EngineSettings:
        """The engine's sizing alone, ``ctx_size`` resolved."""
        return EngineSettings(**{name: getattr(self, name) for name in EngineSettings.field_names()})
