"""Run the exported graph (through lmrt's own runtime) and the PyTorch model side by side."""

from __future__ import annotations

import numpy as np

from ..runtime.manifest import Manifest
from ..runtime.model import LoadedModel

PROBE_TEXT = "The quick brown fox jumps over the lazy dog, and lmrt checks every export it writes."


def probe_ids(tokenizer, vocab_size: int, context_length: int, length: int = 16) -> list[int]:
    """A fixed prompt: the probe text's tokens, topped up with fixed pseudo-random ids."""
    ids = [t for t in tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"] if t < vocab_size][:length]
    rng = np.random.default_rng(0)
    ids += rng.integers(0, vocab_size, length - len(ids)).tolist()
    return ids[: max(1, min(length, context_length // 2))]


def validate(model_dir: str, manifest: Manifest, torch_model, prompt_ids: list[int], decode_steps: int = 8) -> dict:
    """Prefill ``prompt_ids`` then ``decode_steps`` cached greedy steps in both; the PyTorch model is
    fed the tokens the ONNX graph chose, so every step compares logits for the same input.

    Returns max absolute and relative (to the largest reference logit) differences and the share of
    positions where both pick the same top token."""
    import torch

    onnx_model = LoadedModel(model_dir, provider="cpu", manifest=manifest)
    decode_steps = max(0, min(decode_steps, manifest.architecture.context_length - len(prompt_ids) - 1))
    max_abs, max_ref, agree, positions = 0.0, 0.0, 0, 0
    ids = np.asarray([prompt_ids], dtype=np.int64)  # [1, n]
    past = None
    total = 0
    state = onnx_model.new_state(1, len(prompt_ids) + decode_steps)
    with torch.no_grad():
        for _ in range(decode_steps + 1):
            total += ids.shape[1]
            mask = np.ones((1, total), dtype=np.int64)
            position_ids = np.arange(total - ids.shape[1], total, dtype=np.int64)[None, :]
            got = onnx_model.forward(state, ids)[0]  # [seq, vocab]
            out = torch_model(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(position_ids),
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
            ref = out.logits[0].float().numpy()  # [seq, vocab]
            max_abs = max(max_abs, float(np.max(np.abs(got - ref))))
            max_ref = max(max_ref, float(np.max(np.abs(ref))))
            agree += int(np.sum(got.argmax(-1) == ref.argmax(-1)))
            positions += got.shape[0]
            ids = np.asarray([[int(got[-1].argmax())]], dtype=np.int64)
    return {
        "prompt_tokens": len(prompt_ids),
        "decode_steps": decode_steps,
        "max_abs_diff": max_abs,
        "max_rel_diff": max_abs / max(max_ref, 1e-12),
        "greedy_agreement": agree / positions,
    }
