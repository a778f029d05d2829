"""Generator: prompt in, text out, for one process using one model directly (no server).

A thin driver over a loaded model (``model.LoadedModel``), one state store and the decode loop
(``decode_loop.DecodeLoop``), run from the caller's thread: each stream runs a loop step whenever it
needs a token, so several streams (interleaved, or from several threads) share the loop and its rows,
each getting the output it would get alone (on a --compute int8 graph, up to near ties: a batch of
several rows runs attention's one-row kernel, docs/runtime.md). A lock makes the steps one at a time. Beam search
(``beam.py``) and scoring (``scoring.py``) borrow rows of the same store, under the same lock.

  stream(prompt, **options)           a TextStream: text pieces as they become final
  generate(prompt, **options)         the stream joined into one string
  generate_batch(prompts, **options)  several prompts (and several sequences each) at once

Every entry point takes ``adapter="NAME"``, one of the model directory's LoRA adapters (None: the
base model); generate_batch also a list of them, one per prompt, and rows with different adapters
share each step.
  iter_tokens(prompt_ids, config)     token ids; returns the finish reason
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Generator as PyGenerator, Iterator, Mapping, Sequence

import numpy as np

from .beam import beam_search
from .checks import is_int
from .config import GenerationConfig
from .decode_loop import DecodeLoop, LoopStats
from .engine_settings import PREFILL_CHUNK
from .model import LoadedModel
from .request import Event, Request, RequestBuilder
from .scoring import Score, score_ids
from .stopping import StopCriteria
from .text_stream import Completion, TextStream, replay_events


class Generator:
    """A loaded model ready to generate. Safe to share between threads, and several streams may be
    open at once: their steps are taken one at a time, each stream's output unaffected by the others.
    ``model_dir`` may also be a LoadedModel another driver uses too.

    >>> from lmrt import runtime
    >>> gen = runtime.Generator("models/smollm2")
    >>> gen.generate("The capital of France is", max_new_tokens=8)
    """

    def __init__(
        self, model_dir: "str | os.PathLike | LoadedModel", provider: str = "auto", threads: int | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
    ):  # fmt: skip
        self.model = model_dir if isinstance(model_dir, LoadedModel) else LoadedModel(model_dir, provider, threads)
        self.model_dir = self.model.model_dir
        self.manifest = self.model.manifest
        self.tokenizer = self.model.tokenizer
        self._requests = RequestBuilder(self.model, self.model.context_length, "the model's context is", cap_budget=True)
        self._loop = DecodeLoop(self.model, self.model.new_state(active=0), prefill_chunk)
        self._lock = threading.Lock()

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
        return self.model.config(**options)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.model.encode(text, add_special_tokens)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.model.decode(token_ids)

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` rendered with the model's chat template."""
        return self.model.chat_prompt(messages, add_generation_prompt)

    # --- requests on the decode loop -------------------------------------------------------

    def request(
        self, prompt_ids: Sequence[int], config: GenerationConfig, on_event: Callable[[Event], None] | None = None,
        logprobs: int | None = None,
    ) -> Request:
        """A decode-loop request for ``prompt_ids`` with this model's stop ids and detokenizer; its
        events go to ``on_event``, or collect in ``request.events``."""
        return self._requests.build(prompt_ids, config, on_event, logprobs)

    def _start(self, requests: list[Request]) -> None:
        """Make room in the store for the requests beside those running and waiting, and queue them;
        the loop admits them at its next step."""
        with self._lock:
            scheduler = self._loop.scheduler
            rows = sum(len(r.choices) for r in requests) + scheduler.waiting_rows()
            capacity = max(r.prompt.shape[0] + r.budget for r in requests)
            self._loop.store.reserve(rows, capacity, [r.prompt for r in requests])
            for request in requests:
                self._loop.submit(request)

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

    def _cancel(self, request: Request) -> Callable[[], None]:
        return lambda: self._loop.cancel(request)

    # --- the public API ----------------------------------------------------------------------

    def iter_tokens(self, prompt_ids: Sequence[int], config: GenerationConfig) -> PyGenerator[int, None, str]:
        """Yield each new token id (stop tokens are not yielded); the generator returns the finish
        reason, "stop", "length" or "stop_string". The prompt is checked here, before the first step.
        With beam search the tokens of the best beam come once the search is over."""
        if config.num_return_sequences > 1:
            raise ValueError("a stream holds one sequence; use generate_batch for num_return_sequences > 1")
        return self._tokens(self._event_source(self.model.prompt_ids(prompt_ids), config)[0])

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
            return self._beam_events(prompt_ids, config), lambda: None
        request = self.request(prompt_ids, config)
        self._start([request])
        return self._events(request), self._cancel(request)

    def _beam_events(self, prompt_ids, config) -> Iterator[Event]:
        best = self._beam_search([prompt_ids], config)[0][0]
        yield from replay_events(best.tokens, best.finish_reason, StopCriteria(self.decode, (), config.stop))

    def _beam_search(self, prompts: list[list[int]], config: GenerationConfig):
        budgets = [self._requests.budget(p, config) for p in prompts]
        stop_ids = self.model.stop_ids(config)
        capacity = max(len(p) + b for p, b in zip(prompts, budgets))
        self._requests.check_memory(config, len(prompts) * config.num_beams, capacity)
        arrays = [np.asarray(p, dtype=np.int64) for p in prompts]
        with self._lock:
            return beam_search(self.model, self._loop.store, arrays, budgets, config, stop_ids)

    def stream(self, prompt: str | Sequence[int], **options: Any) -> TextStream:
        """Generate from ``prompt`` (text or token ids) piece by piece; see GenerationConfig for
        the options."""
        config = self.config(**options)
        if config.num_return_sequences > 1:
            raise ValueError("a stream holds one sequence; use generate_batch for num_return_sequences > 1")
        prompt_ids = self.model.prompt_ids(prompt)
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
        every prompt draws from the same random stream whatever else is in the batch. ``adapter``: one
        adapter's name for every prompt, or a list of names (None for the base model), one per prompt."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError("generate_batch takes a non-empty list of prompts")
        configs = self._configs(len(prompts), options)
        config = configs[0]
        if logprobs is not None and (not is_int(logprobs) or not 0 <= logprobs <= 20):
            raise ValueError(f"logprobs must be an integer from 0 to 20, got {logprobs!r}")
        ids = [self.model.prompt_ids(p) for p in prompts]
        if config.num_beams > 1:
            if logprobs is not None:
                raise ValueError("logprobs are not reported with beam search")
            found = self._beam_search(ids, config) if len({c.adapter for c in configs}) == 1 else [
                self._beam_search([p], c)[0] for p, c in zip(ids, configs)
            ]  # fmt: skip
            return [[self._completion(h.tokens, h.finish_reason, config, h.score) for h in hyps] for hyps in found]
        requests = [self.request(p, c, logprobs=logprobs) for p, c in zip(ids, configs)]
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

    def _configs(self, count: int, options: dict[str, Any]) -> list[GenerationConfig]:
        """One config per prompt of a batch: ``adapter`` may be a list with one entry per prompt."""
        adapter = options.pop("adapter", None)
        if adapter is None or isinstance(adapter, str):
            return [self.config(adapter=adapter, **options)] * count
        if not isinstance(adapter, Sequence) or len(adapter) != count:
            raise ValueError(f"adapter must be one adapter's name or a list of {count}, one per prompt (None: no adapter)")
        return [self.config(adapter=a, **options) for a in adapter]

    def _completion(self, tokens: list[int], reason: str, config: GenerationConfig, score: float | None) -> Completion:
        """A finished beam, its text cut at a stop string exactly as a stream would."""
        events = list(replay_events(tokens, reason, StopCriteria(self.decode, (), config.stop)))
        text = "".join(e.text for e in events)
        kept = [e.token for e in events if e.token is not None]
        return Completion(text, kept, events[-1].finish_reason if events else reason, score)

    def score(
        self, text: str | Sequence[int], window: int | None = None, stride: int | None = None, add_special_tokens: bool = True,
        adapter: str | None = None,
    ) -> Score:  # fmt: skip
        """Log-probability of each token of ``text`` (or token ids) given the ones before it, and the
        text's perplexity; texts longer than ``window`` (default: the context) go in overlapping
        windows ``stride`` tokens apart (default: half a window); with ``adapter``, the model with
        that LoRA adapter."""
        ids = self.encode(text, add_special_tokens) if isinstance(text, str) else self.model.prompt_ids(text)
        slot = self.model.adapter_slot(adapter)
        with self._lock:
            return score_ids(self.model, ids, window=window, stride=stride, store=self._loop.store, adapter=slot)

    def chat(self, messages: Sequence[Mapping[str, Any]], **options: Any) -> str:
        """The assistant's reply to ``messages`` (dicts with "role" and "content"), rendered with the
        model's chat template; options as for ``generate``."""
        return "".join(self.chat_stream(messages, **options))

    def chat_stream(self, messages: Sequence[Mapping[str, Any]], **options: Any) -> TextStream:
        """The assistant's reply to ``messages``, piece by piece."""
        self.config(**options)  # reject bad options before rendering the template
        return self.stream(self.chat_prompt(messages), **options)
