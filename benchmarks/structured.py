"""Structured output: the cost of a constraint's mask per token, for the grammar libraries lmrt could
use, and the cost of a constrained decode against an unconstrained one in lmrt; writes the
"structured" section of docs/benchmarks.md.

Mask time: SmolLM2 writes, greedy under each JSON schema below, the answer to a prompt (lmrt with
llguidance); then every library replays exactly those tokens: at each step it computes the mask of
allowed tokens into a bitmask over the model's vocabulary (49,152 tokens) and accepts the token. The
time is that per-token work (medians and 95th percentiles over the steps, over --runs replays); the
compile time is that of the schema, the tokenizer setup apart. llguidance is lmrt's dependency;
xgrammar and outlines-core are measured only if installed (they are not lmrt's dependencies; xgrammar
also needs torch and transformers, for its tokenizer setup and bitmask):

    pip install xgrammar outlines-core   # in a virtual environment of its own, beside lmrt

Decode cost: the same prompts, lmrt greedy at batch 1 with the schema, then without it for as many
tokens (speculation off in both), decode seconds per generated token from the loop's own counters;
and the mask and matcher advance alone, timed inside the same runs.

    python benchmarks/structured.py models/smol-int8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import date

import numpy as np

from report import machine, write_section


SCHEMAS = {
    "place": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    },
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "role": {"enum": ["engineer", "teacher", "doctor", "artist", "other"]},
            "languages": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 5},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "age", "role", "languages", "address"],
        "additionalProperties": False,
    },
}
PROMPTS = {
    "place": [
        ("Extract the city and its country as JSON.", "I flew to Lyon last spring; Lyon is a city in France."),
        ("Extract the city and the country as JSON.", "Text: My sister lives in Osaka, Japan."),
    ],
    "person": [
        ("Describe the person in the text as JSON.",
         "Maria Lopez, 34, is a teacher in Madrid (postcode 28013). She speaks Spanish, English and French."),
        ("Describe the person in the text as JSON.",
         "Tom Becker is a 51-year-old engineer living in Berlin, zip 10115, who speaks German and English."),
    ],
}  # fmt: skip


def lmrt_outputs(gen, name: str) -> list[list[int]]:
    """The token ids SmolLM2 writes under schema ``name`` for each of its prompts."""
    out = []
    for system, user in PROMPTS[name]:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        result = gen.generate_batch([gen.chat_prompt(messages)], json_schema=SCHEMAS[name], max_new_tokens=200)[0][0]
        assert result.finish_reason == "stop", result
        out.append(result.token_ids)
    return out


def replay(make, sequences: list[list[int]], runs: int) -> tuple[list[float], float]:
    """Per-step seconds of mask + accept over ``sequences``, and the mean compile seconds.
    ``make()`` compiles and returns (compute_mask, accept)."""
    steps, compiles = [], []
    for _ in range(runs):
        for tokens in sequences:
            began = time.perf_counter()
            mask, accept = make()
            compiles.append(time.perf_counter() - began)
            for token in tokens:
                began = time.perf_counter()
                mask()
                accept(token)
                steps.append(time.perf_counter() - began)
    return steps, statistics.mean(compiles)


def llguidance_maker(tokenizer_json: str, vocab: int, eos: list[int], schema: dict):
    import llguidance

    from lmrt.runtime.structured import JSON_WHITESPACE

    tok = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=eos)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_pattern": JSON_WHITESPACE})

    def make():
        matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
        bits = np.zeros((vocab + 31) // 32, dtype=np.int32)

        def mask():
            matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)

        def accept(token):
            assert matcher.consume_token(token), matcher.get_error()

        return mask, accept

    return make


def xgrammar_maker(model_dir: str, vocab: int, eos: list[int], schema: dict):
    import xgrammar
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=os.path.join(model_dir, "tokenizer.json"))
    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=eos)
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)

    def make():
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=True)
        matcher = xgrammar.GrammarMatcher(compiled)
        bits = xgrammar.allocate_token_bitmask(1, vocab)

        def mask():
            matcher.fill_next_token_bitmask(bits)

        def accept(token):
            assert matcher.accept_token(token)

        return mask, accept

    return make


def outlines_maker(tokenizer_json: str, vocab: int, eos: list[int], schema: dict):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    from tokenizers import Tokenizer

    from lmrt.runtime.structured import JSON_WHITESPACE

    tokenizer = Tokenizer.from_str(tokenizer_json)
    byte_of = _bytes_to_unicode()
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    tokens: dict[bytes, list[int]] = {}
    for text, i in tokenizer.get_vocab(with_added_tokens=True).items():
        if text in special or i == eos[0]:
            continue
        tokens.setdefault(bytes(byte_of[c] for c in text), []).append(i)
    vocabulary = Vocabulary(eos[0], tokens)
    regex = build_regex_from_schema(json.dumps(schema), JSON_WHITESPACE)

    def make():
        guide = Guide(Index(regex, vocabulary))
        bits = np.zeros((vocab + 31) // 32, dtype=np.int32)

        def mask():
            guide.write_mask_into(bits.ctypes.data, bits.size, bits.itemsize)

        def accept(token):
            guide.advance(token, return_tokens=False)

        return mask, accept

    return make


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet: character -> the byte it stands for."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def decode_cost(gen, runs: int) -> dict[str, dict[str, float]]:
    """Per schema: decode seconds per token with and without it, and the mask + advance alone."""
    from lmrt.runtime import structured

    spent = []
    mask, advance = structured.Constraint.mask, structured.Constraint.advance

    def timed(fn):
        def wrapper(*args):
            began = time.perf_counter()
            try:
                return fn(*args)
            finally:
                spent.append(time.perf_counter() - began)

        return wrapper

    out = {}
    for name in SCHEMAS:
        per = {"free": [], "constrained": [], "mask": []}
        for _ in range(runs):
            for system, user in PROMPTS[name]:
                prompt = gen.chat_prompt([{"role": "system", "content": system}, {"role": "user", "content": user}])
                length = 64
                for kind in ("constrained", "free"):  # free: as many tokens as the constrained answer has
                    options = {"json_schema": SCHEMAS[name]} if kind == "constrained" else {"min_new_tokens": length}
                    before_s, before_n = gen.stats.decode_seconds, gen.stats.generated_tokens
                    spent.clear()
                    structured.Constraint.mask, structured.Constraint.advance = timed(mask), timed(advance)
                    try:
                        result = gen.generate_batch([prompt], max_new_tokens=length, speculation="off", **options)[0][0]
                    finally:
                        structured.Constraint.mask, structured.Constraint.advance = mask, advance
                    steps = gen.stats.generated_tokens - before_n - 1  # the first token comes from the prompt's pass
                    per[kind].append((gen.stats.decode_seconds - before_s) / max(steps, 1))
                    if kind == "constrained":
                        per["mask"].append(sum(spent) / len(result.token_ids))
                        length = len(result.token_ids)
        out[name] = {k: statistics.median(v) for k, v in per.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an lmrt model directory (SmolLM2-135M-Instruct, int8)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args()

    from lmrt.runtime import Generator

    gen = Generator(args.model, threads=1)
    vocab = gen.manifest.architecture.vocab_size
    eos = list(gen.manifest.tokenizer.eos_token_ids)
    tokenizer_json = gen.tokenizer.to_str()
    makers = {
        "llguidance": lambda s: llguidance_maker(tokenizer_json, vocab, eos, s),
        "xgrammar": lambda s: xgrammar_maker(args.model, vocab, eos, s),
        "outlines-core": lambda s: outlines_maker(tokenizer_json, vocab, eos, s),
    }
    versions = {}
    for lib, module in (("llguidance", "llguidance"), ("xgrammar", "xgrammar"), ("outlines-core", "outlines_core")):
        try:
            from importlib.metadata import version

            __import__(module)
            versions[lib] = version(lib.replace("-", "_") if lib == "outlines-core" else lib)
        except ImportError:
            print(f"{lib} is not installed: skipped", file=sys.stderr)
            makers.pop(lib)

    rows = []
    for name in SCHEMAS:
        sequences = lmrt_outputs(gen, name)
        for lib, maker in makers.items():
            try:
                make = maker(SCHEMAS[name])
                steps, compile_s = replay(make, sequences, args.runs)
            except Exception as e:  # noqa: BLE001 - a library that cannot take the schema or the tokens: say so
                rows.append(f"| {name} | {lib} | failed: {type(e).__name__}: {str(e).splitlines()[0][:80]} | | |")
                continue
            us = sorted(s * 1e6 for s in steps)
            p95 = us[int(0.95 * (len(us) - 1))]
            rows.append(f"| {name} | {lib} | {statistics.median(us):.0f} | {p95:.0f} | {compile_s * 1e3:.1f} |")
            print(rows[-1], file=sys.stderr)

    cost = decode_cost(gen, args.runs)
    cost_rows = [
        f"| {name} | {c['free'] * 1e3:.2f} | {c['constrained'] * 1e3:.2f} | {c['mask'] * 1e6:.0f} "
        f"| {100 * c['mask'] / c['free']:.1f} % | {100 * (c['constrained'] / c['free'] - 1):+.1f} % |"
        for name, c in cost.items()
    ]
    tokens = {name: [len(t) for t in lmrt_outputs(gen, name)] for name in SCHEMAS}
    section = f"""## Structured output: mask time per token, and the cost of a constrained decode

`python benchmarks/structured.py {args.model}`, {date.today().isoformat()}, {machine()}; lmrt on 1
thread. Libraries: {", ".join(f"{k} {v}" for k, v in versions.items())}.

**Mask per token.** SmolLM2-135M-Instruct's vocabulary (49,152 tokens). Each library replays the
tokens SmolLM2 wrote greedy under the schema ({", ".join(f"{k}: {v} tokens" for k, v in tokens.items())},
two prompts each): the mask of allowed tokens into a bitmask, then accepting the token; microseconds
per token, median and 95th percentile over {args.runs} replays; and the schema's compile time.

| schema | library | median µs/token | p95 µs/token | compile ms |
|---|---|---:|---:|---:|
{chr(10).join(rows)}

**A constrained decode in lmrt** (llguidance), greedy, batch 1, speculation off, the same prompts:
decode milliseconds per token without and with the schema (the free run generates as many tokens
as the constrained one), the mask and matcher advance alone per token (µs, measured inside the constrained runs), that
as a share of an unconstrained step, and the whole difference; medians over {args.runs} runs.

| schema | free ms/token | constrained ms/token | mask + advance µs/token | mask share of a step | constrained vs free |
|---|---:|---:|---:|---:|---:|
{chr(10).join(cost_rows)}

Inside the decode loop the mask takes longer than in the replay above, where masks follow each other
with nothing in between: there the model's pass between two masks has most likely evicted the
matcher's tables from the CPU caches. Either way it stays a small share of a step. The whole
difference between the two decodes is within this machine's run-to-run noise.
"""
    if args.no_write:
        print(section)
    else:
        write_section("structured", section)
        print(section)


if __name__ == "__main__":
    main()
