"""EngineSettings: how an Engine is sized (slots, context per slot, queue, prefill chunk).

The one place these defaults live: the Engine, ``lmrt serve``'s options, ``serve()`` and the Ray
deployment all take them from here. Each field's metadata holds its help text and command-line flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .checks import is_int

PREFILL_CHUNK = 256  # prompt tokens read per step, the Generator's default too
DEFAULT_CTX_SIZE = 2048  # positions per slot when ctx_size is not given (or the model's context if smaller)


def _setting(default, help: str, flag: str, least: int):
    return field(default=default, metadata={"help": help, "flag": flag, "least": least})


@dataclass(frozen=True)
class EngineSettings:
    slots: int = _setting(4, "Sequences decoded together (each a cache row).", "--slots", 1)
    ctx_size: int | None = _setting(
        None, "Tokens per slot, prompt and output together [default: 2048, or the model's context if smaller].", "--ctx-size", 2
    )
    max_queue: int = _setting(64, "Requests that may wait for a slot; past that the server answers 503.", "--max-queue", 0)
    prefill_chunk: int = _setting(PREFILL_CHUNK, "Prompt tokens read per step while other sequences decode.", "--prefill-chunk", 1)

    def __post_init__(self) -> None:
        for setting in fields(EngineSettings):
            value, least = getattr(self, setting.name), setting.metadata["least"]
            if value is None and setting.default is None:
                continue
            if not is_int(value) or value < least:
                raise ValueError(f"{setting.name} must be an integer of at least {least}, got {value!r}")

    @classmethod
    def least(cls, name: str) -> int:
        """The least value the setting ``name`` takes."""
        return next(f.metadata["least"] for f in fields(EngineSettings) if f.name == name)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def resolved_ctx_size(self, context_length: int) -> int:
        """Positions per slot for a model of ``context_length``; ValueError when it does not fit."""
        ctx = min(context_length, DEFAULT_CTX_SIZE) if self.ctx_size is None else self.ctx_size
        if not 2 <= ctx <= context_length:
            raise ValueError(f"ctx_size must be from 2 to the model's context ({context_length}), got {ctx}")
        return ctx
