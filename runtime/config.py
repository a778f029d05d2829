"""GenerationConfig: every option of a generation request, validated on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Iterable, Mapping


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate. Each field is also a keyword of ``Generator.generate``/``stream`` and an
    option of ``lmrt generate``.

    max_new_tokens      tokens to generate at most (the context length caps it too)
    temperature         0 is greedy; above 0 samples from softmax(logits / temperature)
    top_k               sample among the k most likely tokens; 0 disables
    top_p               sample among the most likely tokens whose probability reaches p; 1 disables
    repetition_penalty  > 1 discourages tokens already in the prompt or the output; 1 disables
    seed                seed of the sampler's random generator; None draws a fresh one
    stop                strings that end generation; the text stops just before the first one
    stop_token_ids      token ids that end generation; None means the model's end-of-sequence ids
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be a positive integer")
        if not is_num(self.temperature) or not self.temperature >= 0 or self.temperature == float("inf"):
            raise bad("temperature", "must be a finite number >= 0 (0 is greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 disables it)")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be a number in (0, 1]")
        if not is_num(self.repetition_penalty) or not 0 < self.repetition_penalty < float("inf"):
            raise bad("repetition_penalty", "must be a finite number > 0")
        if self.seed is not None and (not is_int(self.seed) or self.seed < 0):
            raise bad("seed", "must be a non-negative integer or None")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not _is_iterable(stop) or not all(isinstance(s, str) and s for s in stop):
            raise bad("stop", "must be a list of non-empty strings")
        object.__setattr__(self, "stop", tuple(stop))
        if self.stop_token_ids is not None:
            ids = self.stop_token_ids
            if not _is_iterable(ids) or not all(is_int(t) and t >= 0 for t in ids):
                raise bad("stop_token_ids", "must be a list of non-negative integers or None")
            object.__setattr__(self, "stop_token_ids", tuple(ids))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "repetition_penalty", float(self.repetition_penalty))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_options(cls, defaults: Mapping[str, Any] | None = None, **options: Any) -> "GenerationConfig":
        """Build a config from the model's defaults overridden by ``options``; an unknown option name
        raises ValueError naming it. Options set to None keep the default."""
        known = set(cls.field_names())
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown generation option {unknown[0]!r}; known: {', '.join(sorted(known))}")
        merged = {k: v for k, v in (defaults or {}).items() if k in known}
        merged.update({k: v for k, v in options.items() if v is not None})
        return cls(**merged)

    def replace(self, **changes: Any) -> "GenerationConfig":
        return dataclasses.replace(self, **changes)


def _is_iterable(v: Any) -> bool:
    return isinstance(v, Iterable) and not isinstance(v, (str, bytes, dict))
