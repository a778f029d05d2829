"""GenerationConfig: every option of a generation request, validated on construction.

Each field carries its own documentation in its metadata: the help text, the command-line flag,
whether the command line and the HTTP server offer it, and the request fields the server takes it
from. The CLI and the server build their options from these, and a bad value is
reported as a ``ConfigError`` that knows its field, so each interface can name it the way its user
typed it (``--top-p`` on the command line, ``top_p`` in Python and HTTP).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Mapping

import numpy as np

# The options that constrain the output (structured output, ``structured.py``); at most one is set.
CONSTRAINT_FIELDS = ("json_schema", "regex", "grammar", "choices")

# A logits processor: (token_ids int64 [n] so far, prompt included; logits float32 [vocab]) -> logits
LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]


class ConfigError(ValueError):
    """A generation option with a bad value; ``field`` is the GenerationConfig field it concerns."""

    def __init__(self, field_name: str, why: str, message: str | None = None):
        self.field = field_name
        self.why = why
        super().__init__(message or f"{field_name} {why}")

    def named(self, name: str) -> str:
        """The message with the option called ``name`` (a CLI flag, say) instead of the field."""
        return f"{name} {self.why}"


def option(
    default: Any, help: str, flag: str | None = None, short: str | None = None, cli: bool = True,
    server: bool = True, aliases: tuple[str, ...] = (), **kw,
):
    """A GenerationConfig field with its documentation: ``flag`` defaults to the field name in
    kebab case; ``cli=False`` keeps it off the command line (Python-only values). ``server=False``
    keeps it out of the HTTP server's requests; ``aliases`` are the request fields the server takes
    it from, in order of precedence (default: the field name)."""
    metadata = {"help": help, "flag": flag, "short": short, "cli": cli, "server": server, "aliases": aliases, **kw}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate. Each field is a keyword of the Generator's and Engine's methods, a field of
    the server's requests and, unless marked Python-only, an option of ``lmrt generate`` and
    ``lmrt chat``; docs/cli.md lists them with their help (generated from this metadata).

    The processors run in transformers' order: repetition penalty, presence and frequency penalties,
    no-repeat n-grams, min_new_tokens, your logits processors; then a constraint's mask (json_schema,
    regex, grammar or choices); then, when sampling, temperature, top-k, top-p and min-p, and a draw.
    """

    max_new_tokens: int = option(
        256, "Tokens to generate at most (the context length caps it too).", short="-n",
        aliases=("max_completion_tokens", "max_tokens"),
    )
    min_new_tokens: int = option(
        0, "The stop tokens are banned until this many tokens are generated.", aliases=("min_tokens",)
    )
    temperature: float = option(0.0, "0 is greedy decoding; above 0 samples from softmax(logits / temperature).", short="-t")
    top_k: int = option(0, "Sample among the k most likely tokens (0: off).")
    top_p: float = option(1.0, "Sample among the most likely tokens whose probability reaches p, in (0, 1] (1: off).")
    min_p: float = option(0.0, "Sample among tokens at least min_p times as likely as the top one (0: off).")
    repetition_penalty: float = option(1.0, "Above 1 discourages tokens already in the prompt or the output (1: off).")
    presence_penalty: float = option(0.0, "Subtracted from the logit of every token already generated, -2 to 2 (OpenAI's).")
    frequency_penalty: float = option(0.0, "Subtracted once per earlier occurrence in the output, -2 to 2 (OpenAI's).")
    no_repeat_ngram_size: int = option(0, "No n-gram of this size appears twice in prompt + output (0: off).")
    num_beams: int = option(
        1, "Beam search with this many beams (1: no beam search; needs temperature 0).", short="-b", server=False
    )
    length_penalty: float = option(
        1.0, "Beam search ranks finished beams by sum of log-probs / length ** this.", server=False
    )
    early_stopping: bool | str = option(
        False,
        "Beam search stops once num_beams beams finish (true), when no running beam is likely to beat them "
        "(false), or when none can (never).",
        choices=("true", "false", "never"), server=False,
    )
    num_return_sequences: int = option(
        1, "Sequences per prompt: independent samples, or the best beams.", short="-N", aliases=("n",)
    )
    seed: int | None = option(None, "Seed of the samplers' random generators (none: fresh randomness).")
    speculation: str = option(
        "auto",
        "Prompt-lookup speculation: propose tokens that repeat earlier text and check several in one step. "
        "auto: for greedy decoding, alone or beside a batch where it pays (--compute int8 models: only alone, and not "
        "those exported without a scratch attention row, where a check may change near-tied greedy choices); "
        "on: in every batch, also for sampling; off.",
        choices=("auto", "on", "off"),
    )
    stop: tuple[str, ...] = option((), "A string that ends generation; the text stops just before it (repeatable).", multiple=True)
    stop_token_ids: tuple[int, ...] | None = option(
        None, "A token id that ends generation (repeatable; default: the model's end-of-sequence ids).",
        flag="--stop-token-id", multiple=True,
    )
    json_schema: dict | str | None = option(
        None, "The output is JSON matching this JSON schema (a file on the command line; needs lmrt[structured]).",
        metavar="FILE", aliases=("response_format", "guided_json"),
    )
    regex: str | None = option(
        None, "The output fully matches this regular expression (needs lmrt[structured]).", aliases=("guided_regex",)
    )
    grammar: str | None = option(
        None, "The output follows this Lark or GBNF grammar (a file on the command line; needs lmrt[structured]).",
        metavar="FILE", aliases=("guided_grammar",),
    )
    choices: tuple[str, ...] = option(
        (), "The output is exactly one of these strings (repeatable; needs lmrt[structured]).", flag="--choice", multiple=True,
        aliases=("guided_choice",),
    )
    adapter: str | None = option(
        None, "Generate with this LoRA adapter of the model directory (`lmrt adapter` adds them; none: the base model).",
        server=False,
    )
    logits_processors: tuple[LogitsProcessor, ...] = option(
        (), "Callables (token_ids, logits) -> logits, run after the built-in penalties and before sampling.", cli=False,
        aliases=("logit_bias",),
    )

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(name, f"{why}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))

        def is_num(v: Any) -> bool:
            return (isinstance(v, (int, float, np.integer, np.floating))) and not isinstance(v, (bool, np.bool_))

        def finite(v: Any) -> bool:
            return is_num(v) and abs(float(v)) < float("inf")

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be a positive integer")
        if not finite(self.temperature) or not self.temperature >= 0:
            raise bad("temperature", "must be a finite number >= 0 (0 is greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 disables it)")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be a number in (0, 1]")
        if not finite(self.repetition_penalty) or not self.repetition_penalty > 0:
            raise bad("repetition_penalty", "must be a finite number > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not is_num(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise bad(name, "must be a number from -2 to 2")
        if not is_int(self.min_new_tokens) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise bad("min_new_tokens", f"must be an integer from 0 to max_new_tokens ({self.max_new_tokens})")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be a number in [0, 1] (0 disables it)")
        if not is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            raise bad("no_repeat_ngram_size", "must be an integer >= 0 (0 disables it)")
        if not is_int(self.num_beams) or self.num_beams < 1:
            raise bad("num_beams", "must be a positive integer (1 is no beam search)")
        if not finite(self.length_penalty):
            raise bad("length_penalty", "must be a finite number")
        if isinstance(self.early_stopping, str) and self.early_stopping in ("true", "false"):
            object.__setattr__(self, "early_stopping", self.early_stopping == "true")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise bad("early_stopping", 'must be True, False or "never"')
        if self.speculation not in ("auto", "on", "off"):
            raise bad("speculation", 'must be "auto", "on" or "off"')
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
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise bad("seed", "must be a non-negative integer below 2**63, or None")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not _is_iterable(stop) or not all(isinstance(s, str) and s for s in stop):
            raise bad("stop", "must be a list of non-empty strings")
        object.__setattr__(self, "stop", tuple(stop))
        if self.stop_token_ids is not None:
            ids = self.stop_token_ids
            if not _is_iterable(ids) or not all(is_int(t) and t >= 0 for t in ids):
                raise bad("stop_token_ids", "must be a list of non-negative integers or None")
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in ids))
        self._check_constraint(bad)
        if self.adapter is not None and not (isinstance(self.adapter, str) and self.adapter):
            raise bad("adapter", "must be the name of one of the model's adapters, or None")
        for name in ("max_new_tokens", "min_new_tokens", "top_k", "no_repeat_ngram_size", "num_beams", "num_return_sequences"):
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.seed is not None:
            object.__setattr__(self, "seed", int(self.seed))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "length_penalty"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def _check_constraint(self, bad: Callable[[str, str], ConfigError]) -> None:
        """The constraint's types, and that there is at most one; its validity needs the tokenizer and
        is checked when a request is made (``structured.py``)."""
        choices = (self.choices,) if isinstance(self.choices, str) else self.choices
        if not _is_iterable(choices) or not all(isinstance(c, str) and c for c in choices):
            raise bad("choices", "must be a list of non-empty strings")
        object.__setattr__(self, "choices", tuple(choices))
        if self.json_schema is not None and not isinstance(self.json_schema, (dict, str, bool)):
            raise bad("json_schema", "must be a JSON schema: a dict, or its JSON text")
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not (isinstance(getattr(self, name), str) and getattr(self, name)):
                raise bad(name, "must be a non-empty string")
        given = [n for n in CONSTRAINT_FIELDS if getattr(self, n) not in (None, ())]
        if len(given) > 1:
            raise ConfigError(given[1], f"cannot be combined with {given[0]}: give one constraint at a time")
        if given and self.num_beams > 1:
            raise ConfigError("num_beams", f"must be 1 with {given[0]}: beam search does not support constrained output")

    @property
    def constrained(self) -> bool:
        return any(getattr(self, n) not in (None, ()) for n in CONSTRAINT_FIELDS)

    @property
    def samples(self) -> bool:
        return self.temperature > 0

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        """The fields with their metadata (help, flag, short, cli, server, aliases, choices, multiple)."""
        return list(fields(cls))

    @staticmethod
    def flag(f: dataclasses.Field) -> str:
        """The command-line flag of field ``f``."""
        return f.metadata.get("flag") or "--" + f.name.replace("_", "-")

    @classmethod
    def flag_of(cls, name: str) -> str:
        """The command-line flag of the field called ``name`` (the name itself if there is none)."""
        for f in fields(cls):
            if f.name == name and f.metadata.get("cli", True):
                return cls.flag(f)
        return name

    @classmethod
    def from_options(cls, defaults: Mapping[str, Any] | None = None, **options: Any) -> "GenerationConfig":
        """Build a config from the model's defaults overridden by ``options``; an unknown option name
        raises ConfigError naming it. Options set to None keep the default."""
        known = set(cls.field_names())
        unknown = sorted(set(options) - known)
        if unknown:
            known_list = ", ".join(sorted(known))
            raise ConfigError(
                unknown[0], f"is not a generation option; known: {known_list}",
                f"unknown generation option {unknown[0]!r}; known: {known_list}",
            )
        merged = {k: v for k, v in (defaults or {}).items() if k in known}
        if (options.get("num_beams") or 1) > 1 and options.get("temperature") is None:
            merged.pop("temperature", None)  # a model that samples by default can still be beam-searched
        merged.update({k: v for k, v in options.items() if v is not None})
        return cls(**merged)

    def replace(self, **changes: Any) -> "GenerationConfig":
        return dataclasses.replace(self, **changes)


def _is_iterable(v: Any) -> bool:
    return isinstance(v, Iterable) and not isinstance(v, (str, bytes, dict))
