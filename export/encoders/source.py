"""Load an encoder for export: the transformers model, its fast tokenizer, and what its
sentence-transformers pipeline does after the transformer (pooling, normalization, length limit).

sentence-transformers describes the pipeline in ``modules.json``: a Transformer, then a Pooling
module (its config in ``1_Pooling/config.json``, either as ``pooling_mode`` or as the older
``pooling_mode_*_tokens`` flags), then optionally Normalize. A directory without one is pooled the
way sentence-transformers pools a plain transformers model: the mean of its tokens, not normalized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ExportError
from ...runtime.errors import first_line
from ..source import locate, require_fast_tokenizer
from ..source_files import read_json
from .families import EncoderFamily, family_for
from .graph import POOLINGS, activation_kind
from .task import MODULES_FILE

_LEGACY_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_MODE_NAMES = {"mean_sqrt_len_tokens": "mean_sqrt_len"}  # sentence-transformers' name -> lmrt's


@dataclass
class EncoderSource:
    source: str  # as the user gave it
    kind: str  # "directory" or "hub"
    task: str  # "embed" or "classify"
    family: EncoderFamily
    model: Any  # embed: the base model (BertModel, ...); classify: the *ForSequenceClassification model
    tokenizer: Any  # transformers fast tokenizer
    context_length: int  # positions the model has
    max_length: int  # tokens per text the pipeline keeps
    pooling: str = ""  # embed
    normalize: bool = False  # embed

    @property
    def base_model(self):
        return self.model.base_model


def load_encoder(source: str, task: str) -> EncoderSource:
    kind, path, extra = locate(source)
    if kind == "gguf":
        raise ExportError("a GGUF file holds a decoder; --task embed / classify take a Hugging Face encoder")
    pooling, normalize, pipeline_length = _pipeline(source) if task == "embed" else ("", False, None)
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ExportError(f"could not load {source}: {first_line(e)}") from None
    try:
        family = family_for(config.model_type)
        activation_kind(getattr(config, family.activation_attribute))
    except ValueError as e:
        raise ExportError(str(e)) from None
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise ExportError(f"position_embedding_type {config.position_embedding_type!r} is not supported; only absolute")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ExportError(f"{source} is configured as a decoder; encoders export bidirectional models only")
    architectures = config.architectures or []
    if task == "classify" and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ExportError(
            f"{source} has no sequence-classification head (its config lists "
            f"{', '.join(architectures) or 'no architectures'}); export it with --task embed"
        )
    loader = AutoModelForSequenceClassification if task == "classify" else AutoModel
    try:
        model = loader.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ExportError(f"could not load {source}: {first_line(e)}") from None
    require_fast_tokenizer(tokenizer, source)
    model.eval()
    offset = int(config.pad_token_id) + 1 if family.positions_after_padding else 0
    context = int(config.max_position_embeddings) - offset
    limits = [context, pipeline_length, tokenizer.model_max_length]
    max_length = min(int(n) for n in limits if isinstance(n, int) and 0 < n < 1_000_000)
    return EncoderSource(source, kind, task, family, model, tokenizer, context, max_length, pooling, normalize)


def _pipeline(source: str) -> tuple[str, bool, int | None]:
    """(pooling, normalize, max_seq_length) of the sentence-transformers pipeline in ``source``."""
    modules = read_json(source, MODULES_FILE)
    config = read_json(source, "sentence_bert_config.json")
    length = config.get("max_seq_length") if isinstance(config, dict) else None
    if modules is None:
        return "mean", False, length
    pooling, normalize = None, False
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        path = module.get("path", "")
        if kind == "Transformer":
            if path:
                raise ExportError(f"the transformer of {source} lies in {path}/; lmrt exports it from the top directory only")
        elif kind == "Pooling":
            pooling = _pooling_mode(read_json(source, f"{path}/config.json") or {}, source)
        elif kind == "Normalize":
            normalize = True
        else:
            raise ExportError(f"{source} has a sentence-transformers {kind} module, which lmrt cannot export yet")
    if pooling is None:
        raise ExportError(f"{source}'s {MODULES_FILE} has no Pooling module")
    return pooling, normalize, length


def _pooling_mode(config: dict, source: str) -> str:
    modes = config.get("pooling_mode")
    if modes is None:
        modes = [mode for key, mode in _LEGACY_POOLING.items() if config.get(key)]
    modes = [_MODE_NAMES.get(m, m) for m in ([modes] if isinstance(modes, str) else list(modes))]
    if len(modes) != 1 or modes[0] not in POOLINGS:
        raise ExportError(
            f"{source} pools with {' + '.join(modes) or 'nothing'}; lmrt exports one of {', '.join(POOLINGS)}"
        )
    return modes[0]
