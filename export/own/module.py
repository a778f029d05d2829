"""The user's module, checked before anything heavy runs: put in eval mode for the export (and put
back as it was), its logits' shape and vocabulary, and whether it is causal."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ...runtime.errors import first_line
from ..errors import ExportError
from .recurrent import model_logits

CAUSAL_PROBE = 12  # tokens in the causality probe


@contextmanager
def evaluated(module: nn.Module):
    """``module`` in eval mode (dropout off) inside the block; every submodule's training flag is
    put back as the caller left it afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        for m, training in flags:
            m.training = training


def probe(vocab_size: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Fixed pseudo-random token ids [batch, length] below ``vocab_size``."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, vocab_size, size=(batch, length)).astype(np.int64))


def logits_vocabulary(module: nn.Module, tokenizer_size: int) -> int:
    """The size of the module's logits (its vocabulary) once it matches the tokenizer's; a module
    that cannot run on ids [batch, seq] is refused in one line."""
    try:
        logits = model_logits(module, probe(tokenizer_size, 2, 3))
    except ExportError:
        raise
    except Exception as e:  # the user's code: any error, said in one line
        raise ExportError(f"the module's forward failed on token ids [2, 3] ({type(e).__name__}: {first_line(e)}); lmrt calls forward(ids [batch, seq]) -> logits") from None
    vocab = int(logits.shape[-1])
    if vocab != tokenizer_size:
        raise ExportError(f"the module's logits have {vocab} entries but the tokenizer has {tokenizer_size} tokens; they must be the same vocabulary")
    return vocab


def check_causal(module: nn.Module, vocab_size: int, tolerance: float) -> None:
    """Refuse a module whose logits at a position change when a later token does (it reads the
    future, so generating with it would not be the model that was trained)."""
    ids = probe(vocab_size, 1, CAUSAL_PROBE, seed=1)
    cut = CAUSAL_PROBE // 2
    changed = ids.clone()
    changed[0, cut:] = (ids[0, cut:] + 1 + probe(max(vocab_size - 1, 1), 1, CAUSAL_PROBE - cut, seed=2)[0]) % vocab_size
    before, after = model_logits(module, ids)[0, :cut], model_logits(module, changed)[0, :cut]
    scale = float(before.abs().max()) or 1.0
    moved = (before - after).abs().max(dim=-1).values / scale
    if float(moved.max()) > tolerance:
        t = int(np.flatnonzero(moved.numpy() > tolerance)[0])
        raise ExportError(
            f"the module is not causal: its logits at position {t} change when tokens from position {cut} on change; "
            "a language model's logits at t may depend only on tokens up to t (check its attention mask)"
        )

