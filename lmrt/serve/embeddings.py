"""``POST /v1/embeddings``: an encoder's vectors for texts or token ids, as floats or base64."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..runtime import Encoder
from ..runtime.checks import is_int
from .errors import APIError
from .options import read_value
from .requests import check_fields, check_model, read_inputs

EMBEDDING_FIELDS = {"model", "input", "encoding_format", "dimensions", "user", "truncate_prompt_tokens"}
MAX_INPUTS = 2048  # inputs per request, OpenAI's limit
MAX_TOKENS = 300_000  # tokens per request, all inputs together, OpenAI's limit


@dataclass(frozen=True)
class EmbeddingRequest:
    ids: list[list[int]]  # token ids per input, special tokens included
    base64: bool


def parse_embeddings(body: Any, encoder: Encoder, served: str) -> EmbeddingRequest:
    """An embeddings request: ``input`` a string, strings, token ids or lists of them, at most
    MAX_INPUTS of them and MAX_TOKENS tokens together; each within the model's length, or cut to its
    last tokens when the request sets ``truncate_prompt_tokens``."""
    check_fields(body, EMBEDDING_FIELDS, ("model", "input"))
    check_model(body, served)
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise APIError(400, "'encoding_format' must be 'float' or 'base64'", "encoding_format")
    dimensions = read_value(body, "dimensions", is_int, "an integer")
    if dimensions is not None and dimensions != encoder.dimension:
        raise APIError(400, f"'dimensions' cannot change this model's embedding size ({encoder.dimension})", "dimensions")

    keep = _truncation(body, encoder.max_length)

    def tokenize(texts: list[str]) -> list[list[int]]:
        try:
            return encoder.tokenize_keeping_last(texts, keep)
        except ValueError as e:
            raise APIError(400, f"'truncate_prompt_tokens': {e}", "truncate_prompt_tokens") from None

    ids = read_inputs(body["input"], "input", encoder.manifest.architecture.vocab_size, tokenize)
    if len(ids) > MAX_INPUTS:
        raise APIError(400, f"'input' has {len(ids)} inputs, more than {MAX_INPUTS} per request", "input")
    if keep is not None:
        ids = [p[-keep:] for p in ids]  # token ids given as they are: their last ones kept
    too_long = [i for i, p in enumerate(ids) if len(p) > encoder.max_length]
    if too_long:
        raise APIError(400, f"input {too_long[0]} has {len(ids[too_long[0]])} tokens, more than the model's {encoder.max_length}; "
                       "shorten it, or set 'truncate_prompt_tokens' to keep its last tokens (-1: as many as the model takes)",
                       "input", "context_length_exceeded")  # fmt: skip
    total = sum(len(p) for p in ids)
    if total > MAX_TOKENS:
        raise APIError(400, f"the inputs have {total} tokens together, more than {MAX_TOKENS} per request; send fewer at once",
                       "input", "context_length_exceeded")  # fmt: skip
    return EmbeddingRequest(ids, fmt == "base64")


def _truncation(body: dict, max_length: int) -> int | None:
    """vLLM's ``truncate_prompt_tokens``: how many of each input's last tokens to keep (-1: as many
    as the model takes), or None: an input longer than the model takes is refused."""
    keep = read_value(body, "truncate_prompt_tokens", is_int, "an integer")
    if keep is None:
        return None
    if keep == -1:
        return max_length
    if not 1 <= keep <= max_length:
        raise APIError(400, f"'truncate_prompt_tokens' must be -1 (the model's {max_length}) or from 1 to {max_length}, got {keep}",
                       "truncate_prompt_tokens")  # fmt: skip
    return keep


def embeddings_response(vectors, request: EmbeddingRequest, served: str) -> dict:
    data = []
    for i, v in enumerate(vectors):
        v = np.asarray(v, dtype="<f4")
        value = base64.b64encode(v.tobytes()).decode("ascii") if request.base64 else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = sum(len(p) for p in request.ids)
    return {"object": "list", "data": data, "model": served, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
