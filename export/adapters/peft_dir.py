"""A PEFT LoRA directory read and checked: ``adapter_config.json`` and ``adapter_model.safetensors``.

What lmrt computes is plain LoRA on linear projections: y = x W + (x A^T) B^T * scale, scale being
lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)), r and lora_alpha of each module as PEFT's
``rank_pattern`` and ``alpha_pattern`` give them. Every other PEFT method and option that changes
that computation (DoRA, trained biases, fully trained modules, embedding targets, replicated layers)
is refused in one line rather than computed differently.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ...runtime.checks import is_int, is_number
from ..errors import AdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LORA_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<kind>[AB])\.weight")
# options whose any value but their default changes what LoRA computes: (key, default, what it is)
REFUSED = (
    ("use_dora", False, "DoRA (weight-decomposed LoRA)"),
    ("bias", "none", "trained biases (bias)"),
    ("lora_bias", False, "trained biases of lora_B (lora_bias)"),
    ("modules_to_save", None, "fully trained modules (modules_to_save)"),
    ("layer_replication", None, "replicated layers (layer_replication)"),
    ("trainable_token_indices", None, "trained token embeddings (trainable_token_indices)"),
    ("target_parameters", None, "parameters as targets (target_parameters)"),
    ("use_qalora", False, "QALoRA (use_qalora)"),
    ("alora_invocation_tokens", None, "activated LoRA (alora_invocation_tokens)"),
)


@dataclass(frozen=True)
class PeftLora:
    rank: int
    alpha: float
    use_rslora: bool
    base_model: str
    matrices: dict[str, tuple[np.ndarray, np.ndarray]]  # source module -> A [r, in], B [out, r] (float32)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def read_peft(peft_dir: str) -> PeftLora:
    """The LoRA adapter in ``peft_dir``; AdapterError (one line) for anything lmrt does not compute."""
    config = _config(peft_dir)
    kind = config.get("peft_type")
    if kind != "LORA":
        raise AdapterError(f"{peft_dir} holds an adapter of PEFT type {kind}; lmrt adds LoRA adapters only")
    for key, default, what in REFUSED:
        if config.get(key, default) not in (default, None, {}, [], False):
            raise AdapterError(f"{peft_dir} uses {what}, which lmrt does not support; train a plain LoRA adapter")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterError(f"{peft_dir} adapts a model for {config['task_type']}; lmrt adds CAUSAL_LM adapters")
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not is_int(rank) or rank < 1 or not is_number(alpha):
        raise AdapterError(f"{peft_dir}/{CONFIG_FILE} needs a positive integer r and a number lora_alpha, got {rank!r}, {alpha!r}")
    rslora = bool(config.get("use_rslora"))
    ranks, alphas = (_pattern(peft_dir, config, key, number) for key, number in (("rank_pattern", is_int), ("alpha_pattern", is_number)))
    lora = PeftLora(int(rank), float(alpha), rslora, str(config.get("base_model_name_or_path") or ""), {})
    matrices = {}
    for module, (a, b) in _matrices(peft_dir, lambda module: _matched(ranks, module, rank)).items():
        # a module of its own rank or alpha: its B carries its scale's ratio to the adapter's
        own = _matched(alphas, module, alpha) / (math.sqrt(a.shape[0]) if rslora else a.shape[0])
        matrices[module] = (a, b if own == lora.scale else b * np.float32(own / lora.scale))
    return dataclasses.replace(lora, matrices=matrices)


def _pattern(peft_dir: str, config: dict, key: str, valid) -> dict[str, float]:
    """PEFT's ``rank_pattern`` / ``alpha_pattern``: {module pattern: value}, each pattern a regular
    expression and each value positive, or AdapterError."""
    pattern = config.get(key) or {}
    if not isinstance(pattern, dict) or not all(isinstance(k, str) and valid(v) and v > 0 for k, v in pattern.items()):
        raise AdapterError(f"{peft_dir}/{CONFIG_FILE}: {key} must map module names to positive numbers, got {pattern!r}")
    for k in pattern:
        try:
            re.compile(k)
        except re.error as e:
            raise AdapterError(f"{peft_dir}/{CONFIG_FILE}: {key} key {k!r} is not a regular expression ({e})") from None
    return pattern


def _matched(pattern: dict[str, float], module: str, default):
    """The value of the first key of ``pattern`` that ends ``module`` (PEFT's own matching of its
    rank and alpha patterns: ``(.*\\.)?(KEY)$``), or ``default``."""
    return next((v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", module)), default)


def _config(peft_dir: str) -> dict:
    if not os.path.isdir(peft_dir):
        raise AdapterError(f"PEFT adapter directory not found: {peft_dir}")
    path = os.path.join(peft_dir, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise AdapterError(f"{peft_dir} has no {CONFIG_FILE}; is it a directory written by PEFT's save_pretrained?") from None
    except (OSError, ValueError) as e:
        raise AdapterError(f"cannot read {path} ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path} is not a JSON object")
    return config


def _matrices(peft_dir: str, rank_of: Callable[[str], int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{module: (A [r, in], B [out, r])} from the safetensors file, every name and shape checked
    (r: ``rank_of(module)``)."""
    path = os.path.join(peft_dir, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise AdapterError(f"{peft_dir} has no {WEIGHTS_FILE} (lmrt reads safetensors, never pickled .bin files)")
    from safetensors import safe_open

    found: dict[str, dict[str, np.ndarray]] = {}
    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            others = [k for k in keys if LORA_KEY.fullmatch(k) is None]
            if others:  # the most telling one named: an embedding's LoRA, DoRA, or the first other tensor
                key = next((k for k in others if "lora_embedding" in k), next((k for k in others if "lora_magnitude" in k), others[0]))
                whole = re.fullmatch(r"base_model\.model\.(.+)\.base_layer\.weight", key)
                if whole:  # PEFT saves an embedding or lm_head target's own weights beside its LoRA
                    raise AdapterError(f"{path} adapts {whole[1]} and holds its weights whole (an embedding or lm_head "
                                       "target); lmrt adapts each layer's attention and MLP projections only")  # fmt: skip
                what = "an embedding's LoRA" if "lora_embedding" in key else "DoRA's magnitude vector" if "lora_magnitude" in key else "not a LoRA matrix"
                raise AdapterError(f"{path} holds {key} ({what}); lmrt adds LoRA adapters of linear projections only")
            for key in keys:
                match = LORA_KEY.fullmatch(key)
                found.setdefault(match["module"], {})[match["kind"]] = f.get_tensor(key).float().numpy()
    except AdapterError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' own errors: a damaged file
        raise AdapterError(f"cannot read {path} ({' '.join(str(e).split())})") from None
    if not found:
        raise AdapterError(f"{path} holds no LoRA matrices")
    out = {}
    for module, pair in sorted(found.items()):
        a, b = pair.get("A"), pair.get("B")
        if a is None or b is None:
            raise AdapterError(f"{path} holds only one of lora_A and lora_B for {module}")
        rank = rank_of(module)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterError(f"{path}: {module}'s lora_A {list(a.shape)} and lora_B {list(b.shape)} are not of rank r = {rank}")
        out[module] = (a, b)
    return out
