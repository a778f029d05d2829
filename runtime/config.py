"""GenerationConfig: every option of a generation request, validated on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable, Mapping

import numpy as np

# A logits processor: (token_ids int64 [n] so far, prompt included; logits float32 [vocab]) -> logits
LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate. Each field is also a keyword of the Generator's methods and, except
    ``logits_processors``, an option of ``lmrt generate`` and ``lmrt chat``.

    max_new_tokens        tokens to generate at most (the context length caps it too)
    min_new_tokens        the stop tokens are banned until this many tokens are generated
    temperature           0 is greedy; above 0 samples from softmax(logits / temperature)
    top_k                 sample among the k most likely tokens; 0 disables
    top_p                 sample among the most likely tokens whose probability reaches p; 1 disables
    min_p                 sample among tokens at least min_p times as likely as the top one; 0 disables
    repetition_penalty    > 1 discourages tokens already in the prompt or the output; 1 disables
    no_repeat_ngram_size  no n-gram of this size appears twice in prompt + output; 0 disables
    num_beams             > 1 is beam search (deterministic: temperature must be 0)
    length_penalty        beam search ranks finished beams by sum of log-probs / length ** this
    early_stopping        beam search: True stops once num_beams beams are finished; False stops when
                          no running beam is likely to beat them; "never" when none can
    num_return_sequences  sequences returned per prompt: independent samples, or the best beams
    seed                  seed of the samplers' random generators; None draws fresh ones
    stop                  strings that end generation; the text stops just before the first one
    stop_token_ids        token ids that end generation; None means the model's end-of-sequence ids
    logits_processors     callables (token_ids, logits) -> logits, applied in order after the
                          built-in penalties and before temperature, top-k, top-p and min-p

    The order follows transformers: repetition penalty, no-repeat n-grams, min_new_tokens, your
    processors, then (when sampling) temperature, top-k, top-p, min-p.
    """

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None
    logits_processors: tuple[LogitsProcessor, ...] = ()

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
        if not is_int(self.min_new_tokens) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise bad("min_new_tokens", f"must be an integer from 0 to max_new_tokens ({self.max_new_tokens})")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be a number in [0, 1] (0 disables it)")
        if not is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            raise bad("no_repeat_ngram_size", "must be an integer >= 0 (0 disables it)")
        if not is_int(self.num_beams) or self.num_beams < 1:
            raise bad("num_beams", "must be a positive integer (1 is no beam search)")
        if not is_num(self.length_penalty) or not abs(self.length_penalty) < float("inf"):
            raise bad("length_penalty", "must be a finite number")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise bad("early_stopping", 'must be True, False or "never"')
        if not is_int(self.num_return_sequences) or self.num_return_sequences < 1:
            raise bad("num_return_sequences", "must be a positive integer")
        if self.num_beams > 1 and self.temperature > 0:
            raise bad("temperature", "must be 0 with beam search (num_beams > 1): beam search does not sample")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise bad("num_return_sequences", f"cannot exceed num_beams ({self.num_beams})")
        if self.num_beams == 1 and self.temperature == 0 and self.num_return_sequences > 1:
            raise bad("num_return_sequences", "above 1 needs sampling (temperature > 0) or beam search (num_beams > 1)")
        processors = self.logits_processors
        if callable(processors):
            processors = (processors,)
        if not _is_iterable(processors) or not all(callable(f) for f in processors):
            raise bad("logits_processors", "must be a list of callables (token_ids, logits) -> logits")
        object.__setattr__(self, "logits_processors", tuple(processors))
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
        for name in ("repetition_penalty", "min_p", "length_penalty"):
            object.__setattr__(self, name, float(getattr(self, name)))

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
        if (options.get("num_beams") or 1) > 1 and options.get("temperature") is None:
            merged.pop("temperature", None)  # a model that samples by default can still be beam-searched
        merged.update({k: v for k, v in options.items() if v is not None})
        return cls(**merged)

    def replace(self, **changes: Any) -> "GenerationConfig":
        return dataclasses.replace(self, **changes)


def _is_iterable(v: Any) -> bool:
    return isinstance(v, Iterable) and not isinstance(v, (str, bytes, dict))
