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

EMBEDDING_FIELDS = {"model", "input", "encoding_format", "dimensions", "user"}


@dataclass(frozen=True)
class EmbeddingRequest:
    ids: list[list[int]]  # token ids per input, special tokens included
    base64: bool


def parse_embeddings(body: Any, encoder: Encoder, served: str) -> EmbeddingRequest:
    """An embeddings request: ``input`` a string, strings, token ids or lists of them."""
    check_fields(body, EMBEDDING_FIELDS, ("model", "input"))
    check_model(body, served)
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise APIError(400, "'encoding_format' must be 'float' or 'base64'", "encoding_format")
    dimensions = read_value(body, "dimensions", is_int, "an integer")
    if dimensions is not None and dimensions != encoder.dimension:
        raise APIError(400, f"'dimensions' cannot change this model's embedding size ({encoder.dimension})", "dimensions")

    def tokenize(texts: list[str]) -> list[list[int]]:
        try:
            return encoder.tokenize(texts)
        except ValueError as e:
            raise APIError(400, str(e), "input") from None

    ids = read_inputs(body["input"], "input", encoder.manifest.architecture.vocab_size, tokenize)
    too_long = [i for i, p in enumerate(ids) if len(p) > encoder.max_length]
    if too_long:
        raise APIError(400, f"input {too_long[0]} has {len(ids[too_long[0]])} tokens, more than the model's {encoder.max_length}",
                       "input", "context_length_exceeded")  # fmt: skip
    return EmbeddingRequest(ids, fmt == "base64")


def embeddings_response(vectors, request: EmbeddingRequest, served: str) -> dict:
    data = []
    for i, v in enumerate(vectors):
        v = np.asarray(v, dtype="<f4")
        value = base64.b64encode(v.tobytes()).decode("ascii") if request.base64 else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = sum(len(p) for p in request.ids)
    return {"object": "list", "data": data, "model": served, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
