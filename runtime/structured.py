"""Structured output: a constraint (JSON schema, regular expression, grammar or a set of choices)
turned into a mask over the vocabulary at each step, through llguidance.

llguidance is an optional dependency (``pip install 'lmrt[structured]'``), imported here only when a
request carries a constraint. ``Grammars`` (one per Generator) holds llguidance's view of the
tokenizer, built once from tokenizer.json, and compiles a request's constraint before any generation:
a bad schema, regex or grammar is a ``ConfigError`` naming its option. Each generated sequence gets
its own ``Constraint``: ``mask(logits)`` leaves only the tokens that keep the output a prefix of
something the constraint accepts (once the output is complete, only the stop tokens),
``choose(sampler, logits, remaining)`` draws the next token within what is left of the budget (its
``budget.BudgetGuard`` keeps a complete answer within reach), and ``advance(token)`` moves it past the
chosen token.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .budget import BudgetGuard, Vocabulary
from .config import CONSTRAINT_FIELDS, ConfigError

if TYPE_CHECKING:
    from .config import GenerationConfig

INSTALL = "pip install 'lmrt[structured]'"
# Whitespace a JSON value may hold between its tokens: bounded, so a small model cannot spend its
# whole budget on blank lines inside an object.
JSON_WHITESPACE = r"(?:\x20|\x0A[\x20\x09]{0,20})?"


def _llguidance(name: str):
    """The llguidance module; without it, a ConfigError for constraint field ``name`` saying what to install."""
    try:
        import llguidance
    except ImportError:
        raise ConfigError(name, f"needs llguidance: {INSTALL}") from None
    return llguidance


def constraint_of(config: "GenerationConfig") -> tuple[str, Any] | None:
    """(field name, value) of the constraint ``config`` sets, or None."""
    for name in CONSTRAINT_FIELDS:
        value = getattr(config, name)
        if value is not None and value != ():
            return name, value
    return None


def grammar_source(name: str, value: Any) -> str:
    """The llguidance grammar for constraint field ``name`` with ``value`` (not yet checked)."""
    llg = _llguidance(name)
    if name == "json_schema":
        schema = value if isinstance(value, str) else json.dumps(value)
        try:
            return llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_pattern": JSON_WHITESPACE})
        except ValueError as e:
            raise ConfigError(name, f"is not a valid JSON schema: {e}") from None
    if name == "regex":
        return llg.LLMatcher.grammar_from_regex(value)
    if name == "choices":
        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
    if name == "grammar":
        try:
            return llg.grammar_from("grammar", value)  # Lark, or GBNF converted to Lark
        except ValueError as e:
            raise ConfigError(name, f"is not a valid grammar: {e}") from None
    raise ValueError(name)


class Grammars:
    """llguidance's tokenizer for one model, and the compiler of constraints for its requests."""

    def __init__(self, tokenizer_json: str, vocab_size: int):
        self._json = tokenizer_json
        self.vocab_size = vocab_size
        self._tokenizers: dict[frozenset[int], Any] = {}  # by stop ids: llguidance's "end" tokens
        self._vocabulary: Vocabulary | None = None  # the tokens a completion search tries, read once

    def _tokenizer(self, stop_ids: frozenset[int], name: str):
        if stop_ids not in self._tokenizers:
            llg = _llguidance(name)
            eos = sorted(stop_ids) or None
            try:
                source = self._json
                if json.loads(self._json).get("decoder") == {"type": "Fuse"}:  # a character-level vocabulary
                    source = llg.TokenizerWrapper(_Concatenated(self._json))
                self._tokenizers[stop_ids] = llg.LLTokenizer(source, n_vocab=self.vocab_size, eos_token=eos)
            except ValueError as e:  # a decoder llguidance does not know, such as words joined with spaces
                raise ConfigError(name, f"needs a tokenizer llguidance can read, and this one's is not: {_first_line(str(e))}") from None
        return self._tokenizers[stop_ids]

    def compile(self, config: "GenerationConfig", stop_ids: frozenset[int]) -> Callable[[], "Constraint"] | None:
        """A maker of fresh per-sequence Constraints for ``config``'s constraint (None without one).
        Raises ConfigError naming the field when the constraint is not valid."""
        found = constraint_of(config)
        if found is None:
            return None
        name, value = found
        llg = _llguidance(name)
        source = grammar_source(name, value)
        tokenizer = self._tokenizer(stop_ids, name)
        failed, messages = llg.LLMatcher.validate_grammar_with_warnings(source, tokenizer)
        if failed:
            what = {"json_schema": "JSON schema", "regex": "regular expression", "grammar": "grammar", "choices": "list of choices"}[name]
            raise ConfigError(name, f"is not a valid {what}: {_first_line(messages[0])}")
        start = llg.LLMatcher(tokenizer, source, log_level=0)
        if start.is_error():
            raise ConfigError(name, f"is not valid: {_first_line(start.get_error())}")
        if self._vocabulary is None:
            self._vocabulary = Vocabulary(tokenizer, self.vocab_size)
        vocabulary, first = self._vocabulary, {}  # the first measure is the same for every sequence of a request
        return lambda: Constraint(start.deep_copy(), self.vocab_size, stop_ids, vocabulary, first)


class _Concatenated:
    """A tokenizer whose decoded text is its tokens' text joined (a character-level vocabulary), as
    llguidance's TokenizerWrapper takes it: each token's bytes (a special one's marked with 0xFF)."""

    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        special = {t.content: i for i, t in self._tokenizer.get_added_tokens_decoder().items() if t.special}
        vocab = sorted(self._tokenizer.get_vocab().items(), key=lambda item: item[1])
        self.tokens = [b"\xff" + t.encode() if t in special else t.encode() for t, _ in vocab]
        self.special_token_ids = sorted(special.values())
        self.eos_token_id = self.special_token_ids[0] if self.special_token_ids else None
        self.bos_token_id = None

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "rejected by llguidance"


class Constraint:
    """One sequence's position in its constraint."""

    def __init__(self, matcher, vocab_size: int, stop_ids: frozenset[int], vocabulary: Vocabulary, first: dict):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self._stop_ids = stop_ids
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self.guard = BudgetGuard(matcher, vocabulary, stop_ids, first)

    @property
    def complete(self) -> bool:
        """Whether the output is complete and nothing may follow it: only a stop token may come."""
        return self.matcher.is_stopped()

    def allowed(self) -> np.ndarray:
        """bool [vocab]: the tokens that may come next (the stop tokens where the output may end)."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        self._check()
        return np.unpackbits(self._bits.view(np.uint8), count=self.vocab_size, bitorder="little").view(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` with every token the constraint forbids at -inf."""
        allowed = self.allowed()
        if not allowed.any():
            raise RuntimeError("the constraint allows no token here")
        out = np.full(logits.shape, -np.inf, dtype=np.float32)
        np.copyto(out, logits, where=allowed)
        return out

    def choose(self, sampler, logits: np.ndarray, remaining: int) -> int:
        """The next token: ``sampler`` over ``logits`` masked, kept within reach of a complete answer
        in the ``remaining`` tokens of the budget (this one included)."""
        return self.guard.choose(sampler, self.mask(logits), remaining)

    def advance(self, token: int) -> None:
        if token in self._stop_ids:
            return
        self.matcher.consume_token(token)
        self._check()
        self.guard.advanced(token)

    def _check(self) -> None:
        if self.matcher.is_error():
            raise RuntimeError(f"constraint: {self.matcher.get_error()}")
