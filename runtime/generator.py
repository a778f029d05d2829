"""Generator: prompt in, text out. The decode loop lives in ``Generator._decode_loop``.

Three layers, each built on the one below:
  iter_tokens(prompt_ids, config)  yields token ids and returns the finish reason
  stream(prompt, **options)        a TextStream: UTF-8-safe text pieces, stop strings, finish reason
  generate(prompt, **options)      the stream joined into one string
"""

from __future__ import annotations

import os
from typing import Any, Generator as PyGenerator, Iterator, Mapping, Sequence

import numpy as np
from tokenizers import Tokenizer

from .chat import render_chat
from .config import GenerationConfig
from .detokenizer import StreamingDetokenizer
from .manifest import load_manifest
from .model import OnnxCausalLM
from .sampling import sample_next
from .scoring import Score, score_ids


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
        reason, "stop" or "length". The prompt is checked here, before the first step."""
        n = len(prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.context_length:
            raise ValueError(
                f"the prompt has {n} tokens but the model's context is {self.context_length}; shorten it"
            )
        stop_ids = self.manifest.tokenizer.eos_token_ids if config.stop_token_ids is None else config.stop_token_ids
        budget = min(config.max_new_tokens, self.context_length - n)
        return self._decode_loop(np.asarray(prompt_ids, dtype=np.int64), config, frozenset(stop_ids), budget)

    def _decode_loop(
        self, history: np.ndarray, config: GenerationConfig, stop_ids: frozenset[int], budget: int
    ) -> PyGenerator[int, None, str]:
        """Prefill the prompt ``history`` (int64 [n]) in one step, then decode one token per step."""
        rng = np.random.default_rng(config.seed)
        self.model.reset(batch=1)
        input_ids = history[None, :]  # [1, n]: the whole prompt in one prefill step
        for _ in range(budget):
            length = history.shape[0]
            logits = self.model.forward(
                input_ids,
                np.ones((1, length), dtype=np.int64),  # attention_mask [1, past + seq]
                np.arange(length - input_ids.shape[1], length, dtype=np.int64)[None, :],  # position_ids [1, seq]
            )[0, -1]  # [vocab]: only the last position predicts the next token
            token = sample_next(
                logits,
                history,
                rng,
                temperature=config.temperature,
                top_k=config.top_k,
                top_p=config.top_p,
                repetition_penalty=config.repetition_penalty,
            )
            if token in stop_ids:
                return "stop"
            yield token
            history = np.append(history, token)
            input_ids = np.array([[token]], dtype=np.int64)  # [1, 1]
        return "length"

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
        """The assistant's reply to ``messages`` (dicts with "role" and "content")."""
        return self.generate(self.chat_prompt(messages), **options)
