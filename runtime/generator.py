"""Generator: prompt in, text out. The decode loops live in ``decoding.decode`` (greedy and
sampling) and ``beam.beam_search``.

Three layers, each built on the one below:
  iter_tokens(prompt_ids, config)  yields token ids and returns the finish reason
  stream(prompt, **options)        a TextStream: UTF-8-safe text pieces, stop strings, finish reason
  generate(prompt, **options)      the stream joined into one string
and beside them, for several prompts or several sequences per prompt:
  generate_batch(prompts, **options)  a list of Completions per prompt
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Generator as PyGenerator, Iterator, Mapping, Sequence

import numpy as np
from tokenizers import Tokenizer

from .beam import beam_search
from .chat import render_chat
from .config import GenerationConfig
from .decoding import Sequence as _Sequence, decode
from .detokenizer import StreamingDetokenizer
from .manifest import load_manifest, require_task
from .model import OnnxCausalLM
from .scoring import Score, score_ids


@dataclass(frozen=True)
class Completion:
    """One generated sequence: its text, token ids (stop tokens excluded), finish reason ("stop",
    "length" or "stop_string") and, for beam search, its score (sum of log-probs / length **
    length_penalty)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    score: float | None = None


class TextStream:
    """Iterate for text pieces. Once exhausted, ``finish_reason`` is "stop" (a stop token),
    "length" (max_new_tokens or the context ran out) or "stop_string"; ``token_ids`` holds the
    generated ids and ``text`` the joined pieces."""

    def __init__(self, tokens: PyGenerator[int, None, str], decode, stop: tuple[str, ...], prompt_ids: list[int]):
        self.prompt_ids = prompt_ids
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.text = ""
        self._pieces = self._run(tokens, StreamingDetokenizer(decode), stop)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        piece = next(self._pieces)
        self.text += piece
        return piece

    def _run(self, tokens: PyGenerator[int, None, str], detok: StreamingDetokenizer, stop: tuple[str, ...]):
        pending = ""  # decoded text not yet released: it might be the start of a stop string
        while True:
            try:
                token = next(tokens)
            except StopIteration as end:
                reason = end.value
                pending += detok.flush()
                break
            self.token_ids.append(token)
            pending += detok.add(token)
            cut = _find_stop(pending, stop)
            if cut is not None:
                tokens.close()
                self.finish_reason = "stop_string"
                if pending[:cut]:
                    yield pending[:cut]
                return
            keep = _held_back(pending, stop)
            if len(pending) > keep:
                yield pending[: len(pending) - keep]
                pending = pending[len(pending) - keep :]
        cut = _find_stop(pending, stop)
        if cut is not None:
            pending, reason = pending[:cut], "stop_string"
        self.finish_reason = reason
        if pending:
            yield pending


def _find_stop(text: str, stop: tuple[str, ...]) -> int | None:
    """Index where the earliest stop string starts in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that could still grow into a stop string."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class Generator:
    """A loaded model ready to generate. Not thread-safe: one request at a time per Generator.

    >>> from lmrt import runtime
    >>> gen = runtime.Generator("models/smollm2")
    >>> gen.generate("The capital of France is", max_new_tokens=8)
    """

    def __init__(self, model_dir: str | os.PathLike, provider: str = "auto", threads: int | None = None):
        self.model_dir = os.fspath(model_dir)
        self.manifest = load_manifest(self.model_dir)
        require_task(self.manifest, ("generate",), self.model_dir)
        self.model = OnnxCausalLM(self.model_dir, self.manifest, provider, threads)
        self.tokenizer = Tokenizer.from_file(os.path.join(self.model_dir, self.manifest.tokenizer.file))

    @property
    def provider(self) -> str:
        """The execution provider in use: "tensorrt", "cuda" or "cpu"."""
        return self.model.provider

    @property
    def context_length(self) -> int:
        return self.model.context_length

    def config(self, **options: Any) -> GenerationConfig:
        """The model's generation defaults overridden by ``options``."""
        return GenerationConfig.from_options(self.manifest.generation_defaults, **options)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def iter_tokens(self, prompt_ids: Sequence[int], config: GenerationConfig) -> PyGenerator[int, None, str]:
        """Yield each new token id (stop tokens are not yielded); the generator returns the finish
        reason, "stop" or "length". The prompt is checked here, before the first step. With beam
        search the tokens of the best beam come once the search is over."""
        if config.num_return_sequences > 1:
            raise ValueError("a stream holds one sequence; use generate_batch for num_return_sequences > 1")
        budget = self._budget(prompt_ids, config)
        return self._tokens(np.asarray(prompt_ids, dtype=np.int64), budget, config)

    def _tokens(self, prompt: np.ndarray, budget: int, config: GenerationConfig) -> PyGenerator[int, None, str]:
        stop_ids = self._stop_ids(config)
        if config.num_beams > 1:
            best = beam_search(self.model, [prompt], [budget], config, stop_ids)[0][0]
            yield from best.tokens
            return best.finish_reason
        seq = _Sequence(prompt, budget, _rngs(config.seed, 1)[0])
        for _, token in decode(self.model, [seq], 1, config, stop_ids):
            yield token
        return seq.finish_reason

    def _stop_ids(self, config: GenerationConfig) -> frozenset[int]:
        ids = self.manifest.tokenizer.eos_token_ids if config.stop_token_ids is None else config.stop_token_ids
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

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.encode(prompt)
        ids = list(prompt)
        if not all(isinstance(t, (int, np.integer)) and 0 <= t < self.manifest.architecture.vocab_size for t in ids):
            raise ValueError("a prompt given as token ids must hold integers within the vocabulary")
        return [int(t) for t in ids]

    def stream(self, prompt: str | Sequence[int], **options: Any) -> TextStream:
        """Generate from ``prompt`` (text or token ids) piece by piece; see GenerationConfig for
        the options."""
        config = self.config(**options)
        prompt_ids = self._prompt_ids(prompt)
        tokens = self.iter_tokens(prompt_ids, config)
        return TextStream(tokens, self.decode, config.stop, prompt_ids)

    def generate(self, prompt: str | Sequence[int], **options: Any) -> str:
        """The whole completion of ``prompt`` as one string."""
        return "".join(self.stream(prompt, **options))

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], **options: Any) -> list[list[Completion]]:
        """Complete several prompts (texts or token-id lists) in one batch: for each prompt, a list of
        ``num_return_sequences`` Completions (the best beam first with beam search).

        Each prompt's result is what ``generate`` would give for it alone: prompts are padded on
        the left and masked, and with a seed, copy j of every prompt draws from the same random
        stream whatever else is in the batch."""
        config = self.config(**options)
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError("generate_batch takes a non-empty list of prompts")
        ids = [self._prompt_ids(p) for p in prompts]
        budgets = [self._budget(p, config) for p in ids]
        arrays = [np.asarray(p, dtype=np.int64) for p in ids]
        stop_ids = self._stop_ids(config)
        if config.num_beams > 1:
            found = beam_search(self.model, arrays, budgets, config, stop_ids)
            return [
                [self._completion(p, h.tokens, h.finish_reason, config, h.score) for h in hyps]
                for p, hyps in zip(ids, found)
            ]
        n = config.num_return_sequences
        seqs = [_Sequence(a, b, rng) for a, b in zip(arrays, budgets) for rng in _rngs(config.seed, n)]
        watch = [_StopWatch(self.decode, config.stop) for _ in seqs] if config.stop else None
        for i, token in decode(self.model, seqs, n, config, stop_ids):
            if watch and watch[i].add(token):
                seqs[i].finish_reason = "stop_string"  # leaves the batch; the text is cut below
        return [
            [self._completion(ids[p], s.tokens, s.finish_reason, config) for s in seqs[p * n : (p + 1) * n]]
            for p in range(len(ids))
        ]

    def _completion(self, prompt_ids, tokens, reason, config, score=None) -> Completion:
        """Run finished tokens through the same TextStream a stream uses, so stop strings cut the
        text (and the token ids) exactly as streaming would."""
        stream = TextStream(_replay(tokens, reason), self.decode, config.stop, list(prompt_ids))
        text = "".join(stream)
        return Completion(text, stream.token_ids, stream.finish_reason, score)

    def score(
        self, text: str | Sequence[int], window: int | None = None, stride: int | None = None, add_special_tokens: bool = True
    ) -> Score:
        """Log-probability of each token of ``text`` (or token ids) given the ones before it, and the
        text's perplexity; texts longer than ``window`` (default: the context) go in overlapping
        windows ``stride`` tokens apart (default: half a window)."""
        ids = self.encode(text, add_special_tokens) if isinstance(text, str) else self._prompt_ids(text)
        return score_ids(self.model, ids, window=window, stride=stride)

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


def _rngs(seed: int | None, n: int) -> list[np.random.Generator]:
    """Random generators for the ``n`` sequences of one prompt; with a seed, the same ones for every
    prompt and every call."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]


def _replay(tokens: list[int], reason: str) -> PyGenerator[int, None, str]:
    yield from tokens
    return reason


class _StopWatch:
    """Detokenizes one sequence of a batch to notice a stop string as soon as it appears."""

    def __init__(self, decode, stop: tuple[str, ...]):
        self._detok = StreamingDetokenizer(decode)
        self._stop = stop
        self._text = ""

    def add(self, token: int) -> bool:
        self._text += self._detok.add(token)
        return _find_stop(self._text, self._stop) is not None
