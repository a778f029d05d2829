"""The tokenizer of a user's model, as a ``tokenizers.Tokenizer``: a tokenizer.json path, a
``tokenizers.Tokenizer``, a transformers tokenizer (its fast backend), or a plain vocabulary (a list
of tokens, index = id; or a file of one: a JSON list, or text with one token per line), which becomes a word-level tokenizer (tokens split on whitespace) or, when
every ordinary token is one character, a character-level one.

Tokens written like ``<eos>``, ``<unk>``, ``[PAD]`` or ``<|endoftext|>`` in a plain vocabulary are
special: matched whole in text, skipped when decoding; the first of ``<eos>``, ``</s>``,
``<|endoftext|>`` is the end of a sequence.
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

from ...runtime.errors import first_line
from ..errors import ExportError

SPECIAL = re.compile(r"^(<\|?[^<>\s]+\|?>|\[[A-Z]+\])$")
EOS_NAMES = ("<eos>", "</s>", "<|endoftext|>", "<EOS>", "[EOS]")
BOS_NAMES = ("<bos>", "<s>", "<BOS>", "[BOS]")
UNK_NAMES = ("<unk>", "<UNK>", "[UNK]")
PAD_NAMES = ("<pad>", "<PAD>", "[PAD]")


def load_tokenizer(tokenizer: Any):
    """A ``tokenizers.Tokenizer`` from any of the accepted forms; ExportError in one line otherwise."""
    from tokenizers import Tokenizer

    if tokenizer is None:
        raise ExportError("a module needs its tokenizer: pass tokenizer= a tokenizer.json path, a tokenizers.Tokenizer, a transformers tokenizer or a list of tokens")
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        return _from_file(os.fspath(tokenizer))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend
    if hasattr(tokenizer, "get_vocab") or hasattr(tokenizer, "vocab_size"):
        raise ExportError("a slow transformers tokenizer has no tokenizer.json; load it with use_fast=True")
    if isinstance(tokenizer, dict):
        tokenizer = [t for t, _ in sorted(tokenizer.items(), key=lambda kv: kv[1])]
    if isinstance(tokenizer, Sequence) and not isinstance(tokenizer, (bytes, bytearray)):
        return from_vocabulary(list(tokenizer))
    raise ExportError(f"cannot use a {type(tokenizer).__name__} as a tokenizer; pass a tokenizer.json path, a tokenizers.Tokenizer, a transformers tokenizer or a list of tokens")


def _from_file(path: str):
    """A tokenizer.json; or a vocabulary file: JSON (a list of tokens, or token -> id), or text with
    one token per line."""
    from tokenizers import Tokenizer

    from ..source_files import load_json

    if not os.path.isfile(path):
        raise ExportError(f"tokenizer file not found: {path}")
    if path.lower().endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            return from_vocabulary([line.rstrip("\r\n") for line in f if line.rstrip("\r\n")])
    data = load_json(path, path)
    if isinstance(data, dict) and "model" in data:
        try:
            return Tokenizer.from_file(path)
        except Exception as e:  # the tokenizers library's own error types
            raise ExportError(f"{path} is not a tokenizer.json the tokenizers library reads ({first_line(e)})") from None
    return load_tokenizer(data) if isinstance(data, (list, dict)) else from_vocabulary([])


def from_vocabulary(tokens: list) -> Any:
    """A word- or character-level tokenizer whose ids are the list's indices."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    if not tokens or not all(isinstance(t, str) and t for t in tokens):
        raise ExportError("a vocabulary is a non-empty list of distinct non-empty strings (index = token id)")
    if len(set(tokens)) != len(tokens):
        raise ExportError(f"the vocabulary lists {next(t for t in tokens if tokens.count(t) > 1)!r} twice; each token needs one id")
    special = [t for t in tokens if SPECIAL.match(t)]
    ordinary = [t for t in tokens if t not in special]
    characters = bool(ordinary) and all(len(t) == 1 for t in ordinary)
    unk = next((t for t in UNK_NAMES if t in tokens), None)
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=unk or "<unk>"))
    if characters:
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
    else:
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # no decoder: tokens are joined by spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tok


def special_ids(tokenizer) -> dict[str, Any]:
    """bos / eos / pad ids and tokens the tokenizer's vocabulary names the usual way."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)

    def first(names):
        return next((n for n in names if n in vocab), None)

    eos, bos, pad = first(EOS_NAMES), first(BOS_NAMES), first(PAD_NAMES)
    return {
        "eos_token_ids": (vocab[eos],) if eos else (),
        "eos_token": eos,
        "bos_token_id": vocab[bos] if bos else None,
        "bos_token": bos,
        "pad_token_id": vocab[pad] if pad else None,
    }
