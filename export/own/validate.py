"""The exported graph, run by lmrt's runtime, against the module itself: the logits of a sequence
read in one pass and fed one token at a time (state carried by the runtime) must equal the module's
logits over the whole sequence, and greedy decoding must choose the tokens a plain PyTorch loop
over the module chooses."""

from __future__ import annotations

import numpy as np
import torch

from ...runtime.manifest import Manifest
from ...runtime.model import LoadedModel
from .module import probe
from .recurrent import model_logits

PROBE_TOKENS = 16
DECODE_STEPS = 8


def module_greedy(module, ids: list[int], steps: int) -> list[int]:
    """``steps`` greedy tokens after ``ids``, the module run over the whole sequence each step."""
    out = list(ids)
    for _ in range(steps):
        out.append(int(model_logits(module, torch.tensor([out]))[0, -1].argmax()))
    return out[len(ids) :]


def validate_module(model_dir: str, manifest: Manifest, module) -> dict:
    model = LoadedModel(model_dir, provider="cpu", manifest=manifest)
    vocab = manifest.architecture.vocab_size
    length = max(1, min(PROBE_TOKENS, manifest.architecture.context_length - DECODE_STEPS - 1))
    ids = probe(vocab, 1, length, seed=3).numpy()
    expected = module_greedy(module, ids[0].tolist(), DECODE_STEPS)
    sequence = np.concatenate([ids[0], expected])[None, :]
    reference = model_logits(module, torch.from_numpy(sequence))[0].float().numpy()  # [n, vocab]

    whole = model.forward(model.new_state(1, sequence.shape[1]), sequence)[0].copy()  # one pass
    state = model.new_state(1, sequence.shape[1])
    steps = np.stack([model.forward(state, sequence[:, t : t + 1])[0, 0].copy() for t in range(sequence.shape[1])])
    greedy, state = [], model.new_state(1, sequence.shape[1])
    logits = model.forward(state, ids, keep=1)[0, -1]
    for _ in range(DECODE_STEPS):
        greedy.append(int(logits.argmax()))
        logits = model.forward(state, np.array([[greedy[-1]]]), keep=1)[0, -1]

    diff = max(float(np.abs(whole - reference).max()), float(np.abs(steps - reference).max()))
    scale = max(float(np.abs(reference).max()), 1e-12)
    return {
        "prompt_tokens": length,
        "decode_steps": DECODE_STEPS,
        "max_abs_diff": diff,
        "max_rel_diff": diff / scale,
        "greedy_agreement": float(np.mean(steps.argmax(-1) == reference.argmax(-1))),
        "greedy_tokens_identical": greedy == expected,
        "compared": "one pass and one token at a time, against the module's logits over the whole sequence",
    }
