"""Run an exported encoder (through lmrt's own runtime, in one padded batch) and the PyTorch model
(one unpadded text at a time) on the same token ids, and compare their outputs."""

from __future__ import annotations

import numpy as np

from ...quantize.encoder_gate import cosines
from ...runtime.encoder import Encoder
from .source import EncoderSource

PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "lmrt checks every export it writes against PyTorch, the encoders too.",
    "Ein kurzer Satz auf Deutsch, und noch einer: Ça marche très bien.",
    "?",
    "Local search on small devices needs embeddings that are fast and faithful. " * 60,  # past the limit
)


def reference(src: EncoderSource, ids: list[int]) -> np.ndarray:
    """What the model's own pipeline gives for one text's token ids: pooled (and normalized)
    embedding, or logits."""
    import torch

    with torch.no_grad():
        out = src.model(input_ids=torch.tensor([ids]))
        if src.task == "classify":
            return out.logits[0].float().numpy()
        h = out.last_hidden_state[0].float()  # [n, hidden]
        pooled = {
            "mean": lambda: h.mean(0),
            "cls": lambda: h[0],
            "max": lambda: h.max(0).values,
            "mean_sqrt_len": lambda: h.sum(0) / np.sqrt(h.shape[0]),
        }[src.pooling]()
        if src.normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=0)
        return pooled.numpy()


def validate_encoder(model_dir: str, src: EncoderSource) -> dict:
    """Largest absolute and relative (to the largest reference value) differences, and the smallest
    cosine similarity (embed) or the share of texts given the same top label (classify)."""
    encoder = Encoder(model_dir, provider="cpu")
    got = encoder.run(list(PROBE_TEXTS), batch_size=len(PROBE_TEXTS))
    ref = np.stack([reference(src, ids) for ids in encoder.tokenize(list(PROBE_TEXTS))])
    max_abs = float(np.max(np.abs(got - ref)))
    result = {
        "texts": len(PROBE_TEXTS),
        "max_abs_diff": max_abs,
        "max_rel_diff": max_abs / max(float(np.max(np.abs(ref))), 1e-12),
    }
    if src.task == "classify":
        result["label_agreement"] = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
    else:
        result["min_cosine"] = float(np.min(cosines(got, ref)))
    return result

