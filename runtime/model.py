"""One forward step of an exported graph: the session, its inputs and the KV cache together."""

from __future__ import annotations

import os

import numpy as np

from .kv_cache import KVCache
from .manifest import Manifest
from .session import available_providers, create_session, resolve_provider


class OnnxCausalLM:
    """Runs the exported graph step by step, keeping the KV cache between calls."""

    def __init__(self, model_dir: str, manifest: Manifest, provider: str = "auto", threads: int | None = None):
        self.manifest = manifest
        chosen = resolve_provider(provider, available_providers())
        path = os.path.join(model_dir, manifest.graph.file)
        self.session, self.provider = create_session(path, chosen, model_dir, threads)
        io = manifest.graph.io
        self._io = io
        self.cache = KVCache(manifest.architecture, io)
        self._outputs = [io.logits, *self.cache.output_names]

    @property
    def context_length(self) -> int:
        return self.manifest.architecture.context_length

    def reset(self, batch: int = 1) -> None:
        self.cache.reset(batch)

    def forward(
        self,
        input_ids: np.ndarray,  # int64 [batch, seq]
        attention_mask: np.ndarray,  # int64 [batch, past + seq]
        position_ids: np.ndarray,  # int64 [batch, seq]
    ) -> np.ndarray:  # float32 [batch, seq, vocab]
        """Run ``seq`` new positions on top of the cache; the cache then holds them too."""
        io = self._io
        feeds = {
            io.input_ids: np.ascontiguousarray(input_ids, dtype=np.int64),
            io.attention_mask: np.ascontiguousarray(attention_mask, dtype=np.int64),
            io.position_ids: np.ascontiguousarray(position_ids, dtype=np.int64),
            **self.cache.feeds(),
        }
        logits, *present = self.session.run(self._outputs, feeds)
        self.cache.update(present)
        return logits.astype(np.float32, copy=False)  # fp16 graphs: sampling and scoring work in fp32
