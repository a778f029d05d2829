"""Generator: prompt in, text out, for one process using one model directly (no server).

It drives the decode loop (``decoding.DecodeLoop``) from the caller's thread: each stream runs a loop
step whenever it needs a token, so several streams (interleaved, or from several threads) share the
loop and its cache rows, each getting exactly the output it would get alone. A lock makes the steps
one at a time. Beam search runs its own loop (``beam.py``), under the same lock.

  stream(prompt, **options)           a TextStream: text pieces as they become final
  generate(prompt, **options)         the stream joined into one string
  generate_batch(prompts, **options)  several prompts (and several sequences each) at once
  iter_tokens(prompt_ids, config)     token ids; returns the finish reason
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Generator as PyGenerator, Iterator, Mapping, Sequence

import numpy as np

from .beam import beam_search
from .chat import render_chat
from .config import ConfigError, GenerationConfig
from .decoding import DecodeLoop, Event, LoopStats, Request, TokenLogprob
from .kv_cache import KVCache
from .manifest import load_manifest, load_tokenizer, require_task
from .memory import check_fits, settle_memory, trim_heap
from .model import OnnxCausalLM
from .scoring import Score, score_ids
from .stopping import StopCriteria
from .structured import Grammars


@dataclass(frozen=True)
class Completion:
    """One generated sequence: its text, token ids (stop tokens excluded), finish reason ("stop",
    "length" or "stop_string"), for beam search its score (sum of log-probs / length **
    length_penalty), and the tokens' log-probabilities when they were asked for."""

    text: str
    token_ids: list[int]
    finish_reason: str
    score: float | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None


class TextStream:
    """Iterate for text pieces. Once exhausted, ``finish_reason`` is "stop" (a stop token),
    "length" (max_new_tokens or the context ran out) or "stop_string"; ``token_ids`` holds the
    generated ids and ``text`` the joined pieces. ``close()`` (or dropping the stream) stops the
    generation early."""

    def __init__(self, events: Iterator[Event], prompt_ids: list[int], on_close: Callable[[], None] = lambda: None):
        self.prompt_ids = prompt_ids
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.text = ""
        self._events = events
        self._on_close = on_close

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        for event in self._events:
            if event.token is not None:
                self.token_ids.append(event.token)
            if event.finish_reason is not None:
                self.finish_reason = event.finish_reason
            if event.text:
                self.text += event.text
                return event.text
        raise StopIteration

    def close(self) -> None:
        self._on_close()

    def __del__(self) -> None:
        self._on_close()


class Generator:
    """A loaded model ready to generate. Safe to share between threads, and several streams may be
    open at once: their steps are taken one at a time, each stream's output unaffected by the others.

    >>> from lmrt import runtime
    >>> gen = runtime.Generator("models/smollm2")
    >>> gen.generate("The capital of France is", max_new_tokens=8)
    """

    def __init__(
        self, model_dir: str | os.PathLike, provider: str = "auto", threads: int | None = None, prefill_chunk: int = 256
    ):
        self.model_dir = os.fspath(model_dir)
        self.manifest = load_manifest(self.model_dir)
        require_task(self.manifest, ("generate",), self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir, self.manifest)
        trim_heap()  # before the session: the tokenizer's parsing leaves temporaries behind
        self.model = OnnxCausalLM(self.model_dir, self.manifest, provider, threads)
        settle_memory(self.model_dir, self.manifest)
        self._loop = DecodeLoop(self.model, self.model.new_cache(), prefill_chunk)
        self._lock = threading.Lock()
        self._grammars: Grammars | None = None  # llguidance's view of the tokenizer, once a constraint needs it

    @property
    def provider(self) -> str:
        """The execution provider in use: "tensorrt", "cuda" or "cpu"."""
        return self.model.provider

    @property
    def context_length(self) -> int:
        return self.model.context_length

    @property
    def stats(self) -> LoopStats:
        """The decode loop's counters: tokens read and generated, time spent, speculation."""
        return self._loop.stats

    def config(self, **options: Any) -> GenerationConfig:
        """The model's generation defaults overridden by ``options``."""
        return GenerationConfig.from_options(self.manifest.generation_defaults, **options)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    # --- requests on the decode loop -------------------------------------------------------

    def _stop_ids(self, config: GenerationConfig) -> frozenset[int]:
        ids = self.manifest.tokenizer.eos_token_ids if config.stop_token_ids is None else config.stop_token_ids
        vocab = self.manifest.architecture.vocab_size
        beyond = [t for t in ids if t >= vocab]
        if beyond:
            raise ConfigError("stop_token_ids", f"must be token ids below the vocabulary size ({vocab}), got {beyond[0]}")
        return frozenset(ids)

    def _budget(self, prompt_ids: Sequence[int], config: GenerationConfig) -> int:
        """New tokens allowed for this prompt: max_new_tokens, capped by the context."""
        n = len(prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.context_length:
            raise ValueError(
                f"the prompt has {n} tokens but the model's context is {self.context_length}; shorten it"
            )
        return min(config.max_new_tokens, self.context_length - n)

    def request(
        self, prompt_ids: Sequence[int], config: GenerationConfig, on_event: Callable[[Event], None] | None = None,
        logprobs: int | None = None,
    ) -> Request:
        """A decode-loop request for ``prompt_ids`` with this model's stop ids and detokenizer; its
        events go to ``on_event``, or collect in ``request.events``."""
        budget = self._budget(prompt_ids, config)
        stop_ids = self._stop_ids(config)
        self._check_memory(config, config.num_return_sequences, len(prompt_ids) + budget)
        constraint = self._constraint(config, stop_ids)
        return Request(
            prompt_ids, config, budget, stop_ids, lambda: StopCriteria(self.decode, stop_ids, config.stop),
            on_event, logprobs, self._speculates(config), constraint,
        )  # fmt: skip

    def _constraint(self, config: GenerationConfig, stop_ids: frozenset[int]):
        """A maker of each choice's constraint (structured output), compiled and checked now, or None."""
        if not config.constrained:
            return None
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer.to_str(), self.manifest.architecture.vocab_size)
        return self._grammars.compile(config, stop_ids)

    def _speculates(self, config: GenerationConfig) -> bool:
        """Whether a request with ``config`` uses prompt-lookup speculation. "auto" means for greedy
        decoding with a graph that computes in float: there a pass that checks several positions gives
        the logits that steps of one position give, to float rounding. A graph that rounds its
        activations to int8 (--compute int8) turns that rounding into visible differences, so a
        near-tied greedy choice could go either way depending on how positions are grouped: there it
        runs only when asked for ("on")."""
        if config.speculation != "auto":
            return config.speculation == "on"
        return not config.samples and self.manifest.quantization.get("compute") != "int8"

    def _start(self, requests: list[Request]) -> None:
        """Give the requests cache rows now (growing the cache if need be) and queue them."""
        with self._lock:
            self._make_room(requests)
            for request in requests:
                self._loop.submit(request)
            self._loop.scheduler.admit()

    def _check_memory(self, config: GenerationConfig, rows: int, capacity: int) -> None:
        """Refuse a batch of ``rows`` sequences the machine cannot hold, naming the option to lower."""
        field = "num_beams" if config.num_beams > 1 else "num_return_sequences"
        a, io = self.manifest.architecture, self.manifest.graph.io
        check_fits(field, getattr(config, field), rows, capacity, KVCache.bytes_per_position(a, io), a.vocab_size)

    def _make_room(self, requests: list[Request]) -> None:
        """Grow the loop's cache so the requests fit beside those running. Rows in use stay; so do
        free rows that share a prefix with the new prompts (a chat's next turn reuses its history)."""
        cache = self._loop.cache
        rows = sum(len(r.choices) for r in requests)
        capacity = max(r.prompt.shape[0] + r.budget for r in requests)
        if cache.free_rows() >= rows and cache.capacity >= capacity:
            return
        owned = cache.owned_rows()
        if owned:
            capacity = max(capacity, cache.capacity)
        free = [r for r in range(cache.active, cache.rows) if r not in owned and cache.lengths[r] <= capacity]
        shared = {r: max(cache.shared_prefix(r, q.prompt) for q in requests) for r in free}
        reuse = sorted((r for r in free if shared[r] > 0), key=lambda r: -shared[r])[:rows]
        cache.resize(len(owned) + rows, capacity, owned + reuse)

    def _events(self, request: Request) -> Iterator[Event]:
        """``request``'s events as they come, stepping the loop whenever none is ready."""
        events = request.events
        while True:
            while not events and not request.done:
                with self._lock:
                    if not events and not request.done:
                        self._loop.step()
            if not events:
                return
            event = events.popleft()
            if event.finish_reason == "error":
                raise request.error
            yield event

    def _run(self, requests: list[Request]) -> None:
        """Step the loop until every one of ``requests`` is done."""
        for request in requests:
            for _ in self._events(request):
                pass

    # --- the public API ----------------------------------------------------------------------

    def iter_tokens(self, prompt_ids: Sequence[int], config: GenerationConfig) -> PyGenerator[int, None, str]:
        """Yield each new token id (stop tokens are not yielded); the generator returns the finish
        reason, "stop", "length" or "stop_string". The prompt is checked here, before the first step.
        With beam search the tokens of the best beam come once the search is over."""
        if config.num_return_sequences > 1:
            raise ValueError("a stream holds one sequence; use generate_batch for num_return_sequences > 1")
        return self._tokens(self._event_source(self._prompt_ids(prompt_ids), config)[0])

    @staticmethod
    def _tokens(events: Iterator[Event]) -> PyGenerator[int, None, str]:
        reason = "length"
        for event in events:
            if event.token is not None:
                yield event.token
            if event.finish_reason is not None:
                reason = event.finish_reason
        return reason

    def _event_source(self, prompt_ids: list[int], config: GenerationConfig) -> tuple[Iterator[Event], Callable[[], None]]:
        """The events of one sequence from ``prompt_ids``, and how to stop it early."""
        if config.num_beams > 1:
            budget = self._budget(prompt_ids, config)
            stop_ids = self._stop_ids(config)
            return self._beam_events(prompt_ids, budget, config, stop_ids), lambda: None
        request = self.request(prompt_ids, config)
        self._start([request])
        return self._events(request), request.cancel

    def _beam_events(self, prompt_ids, budget, config, stop_ids) -> Iterator[Event]:
        best = self._beam_search([np.asarray(prompt_ids, dtype=np.int64)], [budget], config, stop_ids)[0][0]
        yield from _replay(best.tokens, best.finish_reason, StopCriteria(self.decode, (), config.stop))

    def _beam_search(self, prompts, budgets, config, stop_ids):
        capacity = max(len(p) + b for p, b in zip(prompts, budgets))
        self._check_memory(config, len(prompts) * config.num_beams, capacity)
        with self._lock:
            try:
                return beam_search(self.model, prompts, budgets, config, stop_ids)
            finally:
                self.model.reset(1, 1)  # the beams' cache is not kept

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.encode(prompt)
        if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, (Sequence, np.ndarray)):
            raise TypeError(f"a prompt is a str or a list of token ids, got {type(prompt).__name__}")
        ids = list(prompt)
        vocab = self.manifest.architecture.vocab_size
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            raise ValueError(f"a prompt given as token ids must hold integers from 0 to {vocab - 1}")
        return [int(t) for t in ids]

    def stream(self, prompt: str | Sequence[int], **options: Any) -> TextStream:
        """Generate from ``prompt`` (text or token ids) piece by piece; see GenerationConfig for
        the options."""
        config = self.config(**options)
        if config.num_return_sequences > 1:
            raise ValueError("a stream holds one sequence; use generate_batch for num_return_sequences > 1")
        prompt_ids = self._prompt_ids(prompt)
        events, stop = self._event_source(prompt_ids, config)
        return TextStream(events, prompt_ids, stop)

    def generate(self, prompt: str | Sequence[int], **options: Any) -> str:
        """The whole completion of ``prompt`` as one string."""
        return "".join(self.stream(prompt, **options))

    def generate_batch(
        self, prompts: Sequence[str | Sequence[int]], logprobs: int | None = None, **options: Any
    ) -> list[list[Completion]]:
        """Complete several prompts (texts or token-id lists) together: for each prompt, a list of
        ``num_return_sequences`` Completions (the best beam first with beam search). ``logprobs``:
        also report each token's log-probability and this many alternatives (not with beams).

        Each prompt's result is what ``generate`` would give for it alone; with a seed, copy j of
        every prompt draws from the same random stream whatever else is in the batch."""
        config = self.config(**options)
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError("generate_batch takes a non-empty list of prompts")
        if logprobs is not None and (not isinstance(logprobs, int) or not 0 <= logprobs <= 20):
            raise ValueError(f"logprobs must be an integer from 0 to 20, got {logprobs!r}")
        ids = [self._prompt_ids(p) for p in prompts]
        if config.num_beams > 1:
            if logprobs is not None:
                raise ValueError("logprobs are not reported with beam search")
            budgets = [self._budget(p, config) for p in ids]
            stop_ids = self._stop_ids(config)
            found = self._beam_search([np.asarray(p, dtype=np.int64) for p in ids], budgets, config, stop_ids)
            return [[self._completion(h.tokens, h.finish_reason, config, h.score) for h in hyps] for hyps in found]
        requests = [self.request(p, config, logprobs=logprobs) for p in ids]
        texts = [[[] for _ in r.choices] for r in requests]
        lps = [[[] for _ in r.choices] for r in requests]
        self._start(requests)
        for request, text, lp in zip(requests, texts, lps):
            for event in self._events(request):
                text[event.choice].append(event.text)
                if event.logprob is not None:
                    lp[event.choice].append(event.logprob)
        return [
            [
                Completion("".join(t), c.tokens, c.finish_reason, None, tuple(l) if logprobs is not None else None)
                for c, t, l in zip(r.choices, text, lp)
            ]
            for r, text, lp in zip(requests, texts, lps)
        ]

    def _completion(self, tokens: list[int], reason: str, config: GenerationConfig, score: float | None) -> Completion:
        """A finished beam, its text cut at a stop string exactly as a stream would."""
        events = list(_replay(tokens, reason, StopCriteria(self.decode, (), config.stop)))
        text = "".join(e.text for e in events)
        kept = [e.token for e in events if e.token is not None]
        return Completion(text, kept, events[-1].finish_reason if events else reason, score)

    def score(
        self, text: str | Sequence[int], window: int | None = None, stride: int | None = None, add_special_tokens: bool = True
    ) -> Score:
        """Log-probability of each token of ``text`` (or token ids) given the ones before it, and the
        text's perplexity; texts longer than ``window`` (default: the context) go in overlapping
        windows ``stride`` tokens apart (default: half a window)."""
        ids = self.encode(text, add_special_tokens) if isinstance(text, str) else self._prompt_ids(text)
        with self._lock:
            try:
                return score_ids(self.model, ids, window=window, stride=stride)
            finally:
                self.model.reset(1, 1)

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` rendered with the model's chat template."""
        tok = self.manifest.tokenizer
        text = render_chat(tok.chat_template, messages, tok.bos_token, tok.eos_token, add_generation_prompt)
        return self.encode(text, add_special_tokens=False)

    def chat(self, messages: Sequence[Mapping[str, Any]], **options: Any) -> str:
        """The assistant's reply to ``messages`` (dicts with "role" and "content"), rendered with the
        model's chat template; options as for ``generate``."""
        return "".join(self.chat_stream(messages, **options))

    def chat_stream(self, messages: Sequence[Mapping[str, Any]], **options: Any) -> TextStream:
        """The assistant's reply to ``messages``, piece by piece."""
        self.config(**options)  # reject bad options before rendering the template
        return self.stream(self.chat_prompt(messages), **options)


def _replay(tokens: list[int], reason: str, stop: StopCriteria) -> Iterator[Event]:
    """Events for finished ``tokens`` (from beam search), through a stop callback: text pieces, and
    the cut at a stop string."""
    for token in tokens:
        text, why = stop(token)
        yield Event(0, token, text, why)
        if why is not None:
            return
    text, why = stop.finish(reason)
    yield Event(0, None, text, why)
