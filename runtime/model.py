"""One forward step of an exported graph: the session, its inputs, and the binding of a KV cache."""

from __future__ import annotations

import os
import time

import numpy as np

from .compat import at_least, check_onnxruntime, installed_onnxruntime
from .kv_cache import CacheFullError, KVCache
from .manifest import Manifest
from .session import available_providers, check_graph_io, create_session, resolve_provider


MULTI_TOKEN_STEPS_SINCE = "1.20"


class OnnxCausalLM:
    """Runs the exported graph over rows of a KV cache. The cache knows how many positions each row
    holds, so callers pass only the new token ids; masks and positions are derived here.

    ``self.cache`` is the model's own cache, used when a call names none; other caches (a decode
    loop's slots, a beam search's beams) can share the session."""

    def __init__(self, model_dir: str, manifest: Manifest, provider: str = "auto", threads: int | None = None):
        self.manifest = manifest
        check_onnxruntime(manifest, model_dir)
        chosen = resolve_provider(provider, available_providers())
        path = os.path.join(model_dir, manifest.graph.file)
        self.session, self.provider = create_session(path, chosen, model_dir, threads)
        check_graph_io(self.session, manifest, path)
        self._io = manifest.graph.io
        self._logits_dtype = np.dtype(self._io.logits_dtype)
        self._binding = self.session.io_binding()
        self._bound: tuple = ()  # (cache, version, rows) bound to self._binding
        self._logits = np.empty((0, 0, 0), self._logits_dtype)  # bound to self._binding, reused while the shape holds
        self.session_seconds = 0.0  # time spent inside onnxruntime, for measuring Python's share
        # LongRoPE: past this many positions the graph rotates with its long table (0: never)
        self.rotary_switch_after = manifest.architecture.rotary_switch_after
        # GroupQueryAttention's CPU kernel in onnxruntime 1.19 mis-reads a step of several tokens
        # appended to rows that already hold positions: such steps are fed one token at a time there.
        self.one_token_steps = not at_least(installed_onnxruntime(), MULTI_TOKEN_STEPS_SINCE)
        self.cache = self.new_cache()

    def new_cache(self) -> KVCache:
        """An empty cache for this model. It lives where attention runs: onnxruntime's CUDA
        GroupQueryAttention takes float16 only, so a float32 graph runs attention, and keeps its
        cache, on the CPU."""
        on_gpu = self.provider in ("cuda", "tensorrt") and self._io.kv_dtype == "float16"
        return KVCache(self.manifest.architecture, self._io, "cuda" if on_gpu else "cpu")

    @property
    def context_length(self) -> int:
        return self.manifest.architecture.context_length

    def reset(self, batch: int = 1, capacity: int | None = None) -> None:
        """Start ``batch`` empty rows of the model's cache, all in its decode batch, each able to hold
        ``capacity`` positions (default: the context)."""
        capacity = min(capacity or self.context_length, self.context_length)
        self.cache.reset(batch, capacity)

    def forward(
        self, input_ids: np.ndarray, keep: int | None = None, row: int | None = None, cache: KVCache | None = None
    ) -> np.ndarray:
        """Append ``input_ids`` int64 [batch, seq] to every row of the decode batch (or only to row
        ``row``, then batch 1) and return float32 logits [batch, keep, vocab] for the last ``keep``
        positions (all by default). A row that passes a LongRoPE switch is fed again from its start,
        as transformers does, so that every cached key is rotated with the long table.

        For fp32 graphs the logits of a whole-batch call are onnxruntime's output buffer itself, reused
        by the next call of the same shape: copy them to keep them longer."""
        cache = self.cache if cache is None else cache
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if row is not None and self.crosses_switch(int(cache.lengths[row]), ids.shape[1]):
            # keys cached so far were rotated with the short table: feed the row again from its start
            ids = np.concatenate([cache.tokens(row), ids[0]])[None, :]
            cache.truncate(row, 0)
        keep = ids.shape[1] if keep is None else keep
        held = cache.lengths[0 if row is None else row : (0 if row is None else row) + ids.shape[0]]
        if self.one_token_steps and ids.shape[1] > 1 and held.max(initial=0) > 0:
            steps = [self._run(ids[:, i : i + 1], 1, row, cache).copy() for i in range(ids.shape[1])]
            return np.concatenate(steps[ids.shape[1] - keep :], axis=1)
        return self._run(ids, keep, row, cache)

    def _run(self, ids: np.ndarray, keep: int, row: int | None, cache: KVCache) -> np.ndarray:
        """One session run: ``ids`` [batch, seq] appended to the rows, logits of the last ``keep``."""
        count, seq = ids.shape
        start = 0 if row is None else row
        if row is None and count != cache.active:
            raise ValueError(f"{count} rows of input for a decode batch of {cache.active}")
        cache.check_room(start, count, seq)
        io = self._io
        shape = (count, keep, self.manifest.architecture.vocab_size)
        if row is not None:  # one row: a binding of its own, on a view of the buffers
            binding = self.session.io_binding()
            cache.bind(binding, row, 1)
            logits = np.empty(shape, self._logits_dtype)
            binding.bind_output(io.logits, "cpu", 0, self._logits_dtype, list(shape), logits.ctypes.data)
        else:
            binding = self._binding
            bound = (cache, cache.version, count)
            if self._bound != bound:
                cache.bind(binding, 0, count)
                self._bound = bound
                self._logits = np.empty((0, 0, 0), self._logits_dtype)
            if self._logits.shape != shape:  # one buffer while the shape holds: a fresh one per step costs page faults
                self._logits = np.empty(shape, self._logits_dtype)
                binding.bind_output(io.logits, "cpu", 0, self._logits_dtype, list(shape), self._logits.ctypes.data)
            logits = self._logits
        lengths = cache.lengths[start : start + count]
        total = lengths + seq  # [batch]
        mask = (np.arange(int(total.max())) < total[:, None]).astype(np.int64)  # [batch, total]: right-padded
        binding.bind_cpu_input(io.input_ids, ids)
        binding.bind_cpu_input(io.attention_mask, mask)
        if io.position_ids:
            positions = lengths[:, None] + np.arange(seq, dtype=np.int64)  # [batch, seq]
            binding.bind_cpu_input(io.position_ids, positions)
        binding.bind_cpu_input(io.logits_to_keep, np.array(keep, dtype=np.int64))
        began = time.perf_counter()
        self.session.run_with_iobinding(binding)
        self.session_seconds += time.perf_counter() - began
        cache.advance(start, ids)  # the rows now hold the new positions
        return logits.astype(np.float32, copy=False)  # fp16 graphs: sampling and scoring work in fp32

    def crosses_switch(self, length: int, seq: int) -> bool:
        """Whether a row holding ``length`` positions (rotated with the short table) would pass the
        LongRoPE switch by taking ``seq`` more, so that it must be fed again from its start."""
        return 0 < length <= self.rotary_switch_after < length + seq

    def prefill(self, prompts: list[np.ndarray], capacity: int | None = None) -> np.ndarray:
        """Reset to one row per prompt (int64 [n_i] each) and run each prompt into its row; returns
        float32 logits [len(prompts), vocab] at each prompt's last position."""
        self.reset(len(prompts), capacity)
        return np.stack([self.forward(p[None, :], keep=1, row=i)[0, -1] for i, p in enumerate(prompts)])

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Append one token per row of the decode batch (int64 [batch]); returns float32 logits
        [batch, vocab]."""
        return self.forward(np.asarray(tokens, dtype=np.int64)[:, None], keep=1)[:, 0]


__all__ = ["CacheFullError", "OnnxCausalLM"]
