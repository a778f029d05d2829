"""What the decode loop works on: a Request (a prompt to complete ``n`` times), its Choices (one per
sequence) and the Events they produce; and ``RequestBuilder``, the one place a prompt and a
GenerationConfig become a Request (its token budget, stop ids, constraint and speculation).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from .config import GenerationConfig
from .memory import check_fits
from .sampling import Processor, Sampler, make_processors
from .speculation import PromptLookup
from .stopping import StopCriteria

if TYPE_CHECKING:
    from .model import LoadedModel
    from .structured import Constraint, Grammars

StopCallback = Callable[[int], "tuple[str, str | None]"]  # token -> (text released, finish reason or None)


@dataclass(frozen=True)
class TokenLogprob:
    """The model's log-probability of a chosen token, and the most likely alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Event:
    """Something one choice of a request produced: a token (None when it ended without one) with the
    text that became final, and its finish reason once it ended ("stop", "length", "stop_string",
    "cancelled", "error")."""

    choice: int
    token: int | None
    text: str
    finish_reason: str | None = None
    logprob: TokenLogprob | None = None


@dataclass(eq=False)
class Choice:
    """One sequence being generated: its row in the state store is looked up by the choice itself."""

    request: "Request"
    index: int
    sampler: Sampler
    processors: list[Processor]
    stop: StopCallback
    drafter: PromptLookup | None = None  # proposes tokens to check, when speculation is on for it
    constraint: "Constraint | None" = None  # masks the logits to what the request's constraint allows
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    pending: int = -1  # the newest token, sampled but not yet run through the model
    _history: np.ndarray = field(init=False, repr=False)  # prompt + tokens, preallocated

    def __post_init__(self) -> None:
        prompt = self.request.prompt
        self._history = np.empty(prompt.shape[0] + self.request.budget, dtype=np.int64)
        self._history[: prompt.shape[0]] = prompt

    @property
    def history(self) -> np.ndarray:
        """int64 [prompt + generated]: a view."""
        return self._history[: self.request.prompt.shape[0] + len(self.tokens)]

    def append(self, token: int) -> None:
        """``token`` joins the output and is the next one to run through the model."""
        self._history[self.request.prompt.shape[0] + len(self.tokens)] = token
        self.tokens.append(token)
        self.pending = token


class Request:
    """A prompt to complete ``n`` times (``config.num_return_sequences``), at most ``budget`` new
    tokens each. ``stop_callback()`` makes a fresh stop callback per choice; ``on_event`` receives the
    output (from the loop's thread), or without one it collects in ``events``. ``logprobs``: None, or
    how many alternatives to report with each token's log-probability. ``drafter``: a maker of each
    choice's proposer of tokens to check (None: no speculation; never with a ``constraint``: a maker
    of each choice's ``structured.Constraint``). ``adapter``: the slot of its LoRA adapter (0: the base model).
    ``cancel()`` may be called from any thread."""

    def __init__(
        self,
        prompt_ids,
        config: GenerationConfig,
        budget: int,
        stop_ids: frozenset[int],
        stop_callback: Callable[[], StopCallback],
        on_event: Callable[[Event], None] | None = None,
        logprobs: int | None = None,
        drafter: Callable[[], PromptLookup] | None = None,
        constraint: "Callable[[], Constraint] | None" = None,
        adapter: int = 0,
    ):
        self.prompt = np.asarray(prompt_ids, dtype=np.int64)
        self.config = config
        self.budget = budget
        self.events: deque[Event] = deque()
        self.on_event = on_event or self.events.append
        self.logprobs = logprobs
        self.adapter = adapter
        self.prefilled = 0  # prompt positions in the state store
        self.cached_tokens = 0  # of those, how many an earlier sequence had left there
        self.cancelled = False
        self.error: Exception | None = None  # what ended it, when its own processors or callbacks failed
        self.done = False
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        processors = make_processors(config, self.prompt.shape[0], stop_ids)
        seeds = np.random.SeedSequence(config.seed).spawn(config.num_return_sequences)
        self.choices = [
            Choice(self, i, Sampler(config, np.random.default_rng(s)), processors, stop_callback(),
                   drafter() if drafter is not None and constraint is None else None,
                   constraint() if constraint is not None else None)
            for i, s in enumerate(seeds)
        ]  # fmt: skip

    def cancel(self) -> None:
        self.cancelled = True


class RequestBuilder:
    """Turns prompts and configs into Requests for one model, within ``limit`` positions per
    sequence (the model's context, or an engine's slot: ``limit_name``, "the model's context is" or
    "a slot holds", says which in messages).
    ``cap_budget``: max_new_tokens is cut to what the limit leaves (the Generator); otherwise a
    prompt + max_new_tokens past the limit is refused (the Engine, whose slots are fixed)."""

    def __init__(self, model: "LoadedModel", limit: int, limit_name: str, cap_budget: bool):
        self.model = model
        self.limit, self.limit_name, self.cap_budget = limit, limit_name, cap_budget
        self._grammars: Grammars | None = None  # llguidance's view of the tokenizer, once a constraint needs it

    def budget(self, prompt_ids: Sequence[int], config: GenerationConfig) -> int:
        """New tokens allowed for ``prompt_ids``: the one check of a prompt's length."""
        n = len(prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.limit:
            raise ValueError(f"the prompt has {n} tokens but {self.limit_name} {self.limit}; shorten it")
        if self.cap_budget:
            return min(config.max_new_tokens, self.limit - n)
        if n + config.max_new_tokens > self.limit:
            raise ValueError(
                f"the prompt ({n} tokens) and max_new_tokens ({config.max_new_tokens}) need "
                f"{n + config.max_new_tokens} positions, more than {self.limit_name} ({self.limit})"
            )
        return config.max_new_tokens

    def check_memory(self, config: GenerationConfig, rows: int, capacity: int) -> None:
        """Refuse a batch of ``rows`` sequences the machine cannot hold, naming the option to lower."""
        name = "num_beams" if config.num_beams > 1 else "num_return_sequences"
        check_fits(name, getattr(config, name), rows, capacity, self.model.bytes_per_position, self.model.vocab_size)

    def build(
        self, prompt_ids: Sequence[int], config: GenerationConfig, on_event: Callable[[Event], None] | None = None,
        logprobs: int | None = None,
    ) -> Request:
        """A decode-loop request for ``prompt_ids``; its events go to ``on_event``, or collect in
        ``request.events``."""
        budget = self.budget(prompt_ids, config)
        stop_ids = self.model.stop_ids(config)
        self.check_memory(config, config.num_return_sequences, len(prompt_ids) + budget)
        adapter = self.model.adapter_slot(config.adapter)
        constraint = self._constraint(config, stop_ids)
        decode = self.model.decode
        return Request(
            prompt_ids, config, budget, stop_ids, lambda: StopCriteria(decode, stop_ids, config.stop),
            on_event, logprobs, self.drafter(config), constraint, adapter,
        )  # fmt: skip

    def _constraint(self, config: GenerationConfig, stop_ids: frozenset[int]):
        """A maker of each choice's constraint (structured output), compiled and checked now, or None."""
        if not config.constrained:
            return None
        if self._grammars is None:
            from .structured import Grammars

            self._grammars = Grammars(self.model.tokenizer.to_str(), self.model.vocab_size)
        return self._grammars.compile(config, stop_ids)

    def drafter(self, config: GenerationConfig) -> Callable[[], PromptLookup] | None:
        """The maker of a prompt-lookup proposer for each choice of a request with ``config``, or None
        when it does not speculate. "on" speculates in every batch. "auto" speculates for greedy
        decoding where a pass checking several positions gives the logits of one-position steps: on a
        graph with a scratch query row (``GraphIO.scratch_positions``) a row running alone gets them
        bit for bit; float compute gets them to float rounding, also beside a batch. Rounding
        activations to int8 (--compute int8) turns a last-bit difference into visible ones (rows of
        a batch run attention with onnxruntime's one-row kernel, a check pass with its packed one), so
        there "auto" checks only while the row runs alone, and not at all on a graph without the
        scratch row. A fixed (recurrent) state speculates only when asked for: going back over
        rejected tokens restores a snapshot and runs the accepted ones again, in a pass of their own."""
        if config.speculation == "on":
            return lambda: PromptLookup(insist=True)
        if config.speculation == "off" or self.model.fixed_state or config.samples:
            return None
        rounds = self.model.manifest.quantization.get("compute") == "int8"
        if rounds and not self.model.manifest.graph.io.scratch_positions:
            return None
        return lambda: PromptLookup(alone_only=rounds)
