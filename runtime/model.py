"""The loaded model: an exported directory's manifest, tokenizer and onnxruntime session.

It knows nothing of requests. ``forward`` runs the graph over rows of a state store (the caller's:
a decode loop's slots, a beam search's block) and returns logits; masks and positions are derived
from the rows' lengths, so callers pass only the new token ids. The text side (encode, decode, chat
templates, the model's generation defaults) is here too, so every driver and the server share one
object per model. Safe to share between threads: each state store has its own IO binding.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping, Sequence

import numpy as np

from .adapters import AdapterBank, no_adapter_slot
from .chat import render_chat
from .checks import is_int
from .compat import at_least, check_onnxruntime, installed_onnxruntime
from .config import ConfigError, GenerationConfig
from .manifest import Manifest, load_manifest, load_tokenizer, require_task
from .memory import settle_memory, trim_heap
from .session import available_providers, check_graph_io, create_session, resolve_provider
from .state_buffers import bytes_per_position
from .state_spec import state_of
from .state_store import CacheFullError, StateStore

MULTI_TOKEN_STEPS_SINCE = "1.20"


class LoadedModel:
    """``LoadedModel(model_dir)`` loads a generation model; ``manifest`` may be given when the caller
    has read it already."""

    def __init__(
        self, model_dir: str | os.PathLike, provider: str = "auto", threads: int | None = None, manifest: Manifest | None = None
    ):
        self.model_dir = os.fspath(model_dir)
        self.manifest = load_manifest(self.model_dir) if manifest is None else manifest
        require_task(self.manifest, ("generate",), self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir, self.manifest)
        trim_heap()  # before the session: the tokenizer's parsing leaves temporaries behind
        check_onnxruntime(self.manifest, self.model_dir)
        chosen = resolve_provider(provider, available_providers())
        path = os.path.join(self.model_dir, self.manifest.graph.file)
        self.session, self.provider = create_session(path, chosen, self.model_dir, threads)
        check_graph_io(self.session, self.manifest, path)
        lora = self.manifest.lora  # LoRA adapters, loaded once for every row (None: a graph without them)
        self.adapters = AdapterBank(self.model_dir, lora, self.manifest.graph.dtype) if lora is not None else None
        settle_memory(self.model_dir, self.manifest)
        self._io = self.manifest.graph.io
        self._logits_dtype = np.dtype(self._io.logits_dtype)
        # every tensor of a row's state, as the manifest declares it (or the KV cache of its architecture)
        self.state_specs = state_of(self.manifest)
        # a fixed (recurrent) state goes back only by restoring a snapshot and running tokens again
        self.fixed_state = any(spec.kind == "fixed" for spec in self.state_specs)
        self.window = self.manifest.graph.decoding == "window"  # no state: each step re-runs the row's tokens
        self.declared = self.manifest.graph.decoding == "declared"  # a module's own state, fed at each row's length
        self.session_seconds = 0.0  # time spent inside onnxruntime, for measuring Python's share
        # LongRoPE: past this many positions the graph rotates with its long table (0: never)
        self.rotary_switch_after = self.manifest.architecture.rotary_switch_after
        # GroupQueryAttention's CPU kernel in onnxruntime 1.19 mis-reads a step of several tokens
        # appended to rows that already hold positions: such steps are fed one token at a time there.
        self.one_token_steps = not at_least(installed_onnxruntime(), MULTI_TOKEN_STEPS_SINCE)

    # --- sizes -----------------------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        return self.manifest.architecture.context_length

    @property
    def vocab_size(self) -> int:
        return self.manifest.architecture.vocab_size

    @property
    def bytes_per_position(self) -> int:
        """State bytes one position of one row takes."""
        return bytes_per_position(self.state_specs)

    def new_state(self, rows: int = 1, capacity: int = 1, active: int | None = None) -> StateStore:
        """A state store for this model: ``rows`` empty rows of ``capacity`` positions, the first
        ``active`` of them (default: all) in its decode batch. It lives where attention runs: onnxruntime's CUDA
        GroupQueryAttention takes float16 only, so a float32 graph runs attention, and keeps its
        state, on the CPU."""
        on_gpu = self.provider in ("cuda", "tensorrt") and self._io.kv_dtype == "float16" and not self.fixed_state and not self.declared
        store = StateStore(self.manifest.architecture, self._io, "cuda" if on_gpu else "cpu", self.state_specs)
        store.reset(rows, capacity, active)
        return store

    # --- the text side ---------------------------------------------------------------------------

    def config(self, **options: Any) -> GenerationConfig:
        """The model's generation defaults overridden by ``options``."""
        return GenerationConfig.from_options(self.manifest.generation_defaults, **options)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """A prompt as token ids: text is encoded, a list of ids checked against the vocabulary."""
        if isinstance(prompt, str):
            return self.encode(prompt)
        if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, (Sequence, np.ndarray)):
            raise TypeError(f"a prompt is a str or a list of token ids, got {type(prompt).__name__}")
        ids = list(prompt)
        if not all(is_int(t) and 0 <= t < self.vocab_size for t in ids):
            raise ValueError(f"a prompt given as token ids must hold integers from 0 to {self.vocab_size - 1}")
        return [int(t) for t in ids]

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` rendered with the model's chat template."""
        tok = self.manifest.tokenizer
        text = render_chat(tok.chat_template, messages, tok.bos_token, tok.eos_token, add_generation_prompt)
        return self.encode(text, add_special_tokens=False)

    def stop_ids(self, config: GenerationConfig) -> frozenset[int]:
        """The token ids that end a sequence under ``config``: its own, or the model's eos ids."""
        ids = self.manifest.tokenizer.eos_token_ids if config.stop_token_ids is None else config.stop_token_ids
        beyond = [t for t in ids if t >= self.vocab_size]
        if beyond:
            raise ConfigError("stop_token_ids", f"must be token ids below the vocabulary size ({self.vocab_size}), got {beyond[0]}")
        return frozenset(ids)

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The LoRA adapters held (those of the model directory, and any an Engine loaded since), in slot order."""
        return () if self.adapters is None else self.adapters.names

    def adapter_slot(self, name: str | None) -> int:
        """The slot a row using adapter ``name`` runs with (None: 0, the base model); ConfigError
        naming the adapters there are for a name this directory does not hold."""
        return no_adapter_slot(name) if self.adapters is None else self.adapters.slot(name)

    # --- the graph -------------------------------------------------------------------------------

    def forward(self, state: StateStore, input_ids: np.ndarray, keep: int | None = None, row: int | None = None) -> np.ndarray:
        """Append ``input_ids`` int64 [batch, seq] to every row of ``state``'s decode batch (or to the
        ``batch`` rows from ``row`` on) and return float32 logits [batch, keep, vocab] for the last
        ``keep`` positions (all by default). A single row that passes a LongRoPE switch is fed again
        from its start, as transformers does, so that every cached key is rotated with the long table.

        A row of fixed state that went back to a snapshot runs its pending tokens first: in front of
        a single new token, otherwise in a step of their own. Before a step of several tokens the
        store keeps a snapshot of each row's fixed state (a prompt chunk, a speculative check).

        For fp32 graphs the logits of a decode-batch call are the store's logits buffer itself, reused
        by its next call of the same shape: copy them to keep them longer."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        start, (count, seq) = 0 if row is None else row, ids.shape
        pending = state.pending_rows(start, count)
        if pending:
            keep = seq if keep is None else keep
            if count == 1 and seq == 1:
                ids = np.concatenate([state.take_pending(start), ids[0]])[None, :]
            else:
                for r in pending:
                    self._forward(state, state.take_pending(r)[None, :], 1, r)
        if seq > 1:
            state.snapshot(start, count)
        return self._forward(state, ids, keep, row)

    def _forward(self, state: StateStore, ids: np.ndarray, keep: int | None, row: int | None) -> np.ndarray:
        if self.window or self.declared:
            run = self._run_window if self.window else self._run_declared
            return run(state, ids, ids.shape[1] if keep is None else keep, row)
        if row is not None and ids.shape[0] == 1 and self.crosses_switch(int(state.lengths[row]), ids.shape[1]):
            # keys cached so far were rotated with the short table: feed the row again from its start
            ids = np.concatenate([state.tokens(row), ids[0]])[None, :]
            state.truncate(row, 0)
        keep = ids.shape[1] if keep is None else keep
        start = 0 if row is None else row
        held = state.lengths[start : start + ids.shape[0]]
        if self.one_token_steps and ids.shape[1] > 1 and held.max(initial=0) > 0:
            steps = [self._run(state, ids[:, i : i + 1], 1, row).copy() for i in range(ids.shape[1])]
            return np.concatenate(steps[ids.shape[1] - keep :], axis=1)
        return self._run(state, ids, keep, row)

    def _run(self, state: StateStore, ids: np.ndarray, keep: int, row: int | None) -> np.ndarray:
        """One session run: ``ids`` [batch, seq] appended to the rows, logits of the last ``keep``."""
        count, seq = ids.shape
        start = 0 if row is None else row
        if row is None and count != state.active:
            raise ValueError(f"{count} rows of input for a decode batch of {state.active}")
        state.check_room(start, count, seq)
        io = self._io
        shape = (count, keep, self.vocab_size)
        key, constants = 0, None
        if self.adapters is not None:  # the matrices of the rows' adapters, and their positions' places
            key, constants = self.adapters.for_rows(state.adapter_slots(start, count), seq)
        binding, logits = state.binding(self.session, start, count, io.logits, shape, self._logits_dtype, constants, key)
        lengths = state.lengths[start : start + count]
        total = lengths + seq  # [batch]
        mask = (np.arange(int(total.max())) < total[:, None]).astype(np.int64)  # [batch, total]: right-padded
        binding.bind_cpu_input(io.input_ids, ids)
        if io.attention_mask:
            binding.bind_cpu_input(io.attention_mask, mask)
        if io.position_ids:
            positions = lengths[:, None] + np.arange(seq, dtype=np.int64)  # [batch, seq]
            binding.bind_cpu_input(io.position_ids, positions)
        binding.bind_cpu_input(io.logits_to_keep, np.array(keep, dtype=np.int64))
        began = time.perf_counter()
        self.session.run_with_iobinding(binding)
        self.session_seconds += time.perf_counter() - began
        state.advance(start, ids)  # the rows now hold the new positions
        return logits.astype(np.float32, copy=False)  # fp16 graphs: sampling and scoring work in fp32

    def _run_window(self, state: StateStore, ids: np.ndarray, keep: int, row: int | None) -> np.ndarray:
        """A window graph's step: each row's tokens so far and ``ids`` run from the start (rows padded
        on the right: the graph is causal, so padding changes no earlier position), the logits of
        each row's last ``keep`` positions returned."""
        count, seq = ids.shape
        start = 0 if row is None else row
        if row is None and count != state.active:
            raise ValueError(f"{count} rows of input for a decode batch of {state.active}")
        state.check_room(start, count, seq)
        ends = state.lengths[start : start + count] + seq
        window = np.zeros((count, int(ends.max())), dtype=np.int64)
        for i in range(count):
            window[i, : ends[i]] = np.concatenate([state.tokens(start + i), ids[i]])
        began = time.perf_counter()
        logits = self.session.run([self._io.logits], {self._io.input_ids: window})[0]  # [count, longest, vocab]
        self.session_seconds += time.perf_counter() - began
        state.advance(start, ids)
        return np.stack([logits[i, ends[i] - keep : ends[i]] for i in range(count)]).astype(np.float32, copy=False)

    def _run_declared(self, state: StateStore, ids: np.ndarray, keep: int, row: int | None) -> np.ndarray:
        """A declared state's step: the graph takes every state tensor at exactly its rows' length
        (no padding, no mask: the module's code sees its own state), so the rows run in groups of one
        length, each group's kv tensors gaining the new positions."""
        count, seq = ids.shape
        start = 0 if row is None else row
        if row is None and count != state.active:
            raise ValueError(f"{count} rows of input for a decode batch of {state.active}")
        state.check_room(start, count, seq)
        lengths = state.lengths[start : start + count]
        names = [self._io.logits] + [t.present for t in state.buffers.tensors]
        logits = np.empty((count, keep, self.vocab_size), np.float32)
        for length in np.unique(lengths):
            group = np.flatnonzero(lengths == length)
            feeds = {self._io.input_ids: ids[group], self._io.logits_to_keep: np.array(keep, np.int64)}
            feeds.update(state.buffers.exact(start + group, int(length)))
            began = time.perf_counter()
            out = self.session.run(names, feeds)
            self.session_seconds += time.perf_counter() - began
            logits[group] = out[0]
            state.buffers.take(start + group, int(length), out[1:])
        state.advance(start, ids)
        return logits

    def sequence_logits(self, token_ids: Sequence[int], adapter: str | None = None) -> np.ndarray:
        """float32 logits [n, vocab] at every position of ``token_ids``, run in one pass from an empty
        state (a store of one row of its own), with ``adapter`` (None: the base model)."""
        ids = np.asarray([token_ids], dtype=np.int64)
        state = self.new_state(active=0)
        row = state.borrow(object(), 1, ids.shape[1], self.adapter_slot(adapter))
        return self.forward(state, ids, row=row)[0].copy()

    def crosses_switch(self, length: int, seq: int) -> bool:
        """Whether a row holding ``length`` positions (rotated with the short table) would pass the
        LongRoPE switch by taking ``seq`` more, so that it must be fed again from its start."""
        return 0 < length <= self.rotary_switch_after < length + seq


__all__ = ["CacheFullError", "LoadedModel"]
