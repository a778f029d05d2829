"""``lmrt bench``: prefill speed, time to first token, decode speed and peak memory of one model
directory, measured through the runtime's own decode loop."""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass

FILLER = (
    "The history of the printing press begins in the fifteenth century, when movable metal type made "
    "books cheaper to copy than by hand. Within fifty years presses were working in more than two "
    "hundred towns, and the number of books in Europe grew from thousands to millions. "
)


@dataclass(frozen=True)
class BenchResult:
    prompt_tokens: int
    new_tokens: int
    runs: int
    provider: str
    threads: int | None
    prefill_tokens_per_s: float  # prompt tokens / time to first token
    time_to_first_token_ms: float
    decode_tokens_per_s: float  # tokens after the first / time after the first
    python_share: float  # share of a decode step spent outside onnxruntime (sampling, detokenizing, glue)
    speculation: str  # "auto", "on" or "off"
    acceptance: float | None  # speculation: share of proposed tokens accepted (None: nothing proposed)
    peak_rss_mb: float  # the whole process, model loading included
    model_files_mb: float
    kv_cache_mb: float  # the KV cache at its largest: prompt + new tokens
    state: str  # the whole decoding state at its largest, in words (``state_size.state_words``)
    adapter: str | None = None  # the LoRA adapter every run used (None: the base model)


def peak_rss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1e3  # bytes on macOS, KiB elsewhere


def prompt_ids(gen, n: int) -> list[int]:
    """``n`` token ids of ordinary prose, or, for a vocabulary that cannot spell it (a model of one's
    own trained on its words or characters, with no unknown token), its ordinary tokens in turn."""
    try:
        ids = gen.encode(FILLER, add_special_tokens=False)
    except Exception:  # noqa: BLE001 - tokenizers raises a plain Exception for a word it lacks
        ids = []
    if not ids:
        added = gen.tokenizer.get_added_tokens_decoder()
        ids = [i for i in range(gen.model.vocab_size) if i not in added] or [0]
    return (ids * (n // len(ids) + 1))[:n]


def run(
    model_dir: str, prompt_tokens: int, new_tokens: int, runs: int, provider: str, threads: int | None, speculation: str = "off",
    adapter: str | None = None,
) -> BenchResult:
    from .atomic import directory_size
    from .runtime import Generator
    from .runtime.state_buffers import reserved_bytes
    from .state_size import state_words

    if prompt_tokens < 1 or new_tokens < 2 or runs < 1:
        raise ValueError("--prompt-tokens must be at least 1, --new-tokens at least 2 and --runs at least 1")
    gen = Generator(model_dir, provider=provider, threads=threads)
    if prompt_tokens + new_tokens > gen.context_length:
        raise ValueError(
            f"--prompt-tokens + --new-tokens is {prompt_tokens + new_tokens}, more than the model's context ({gen.context_length})"
        )
    ids = prompt_ids(gen, prompt_tokens)
    config = gen.config(max_new_tokens=new_tokens, stop_token_ids=[], temperature=0.0, speculation=speculation, adapter=adapter)
    gen.model.adapter_slot(adapter)  # a name the directory does not hold: refused before any run
    stats = gen.stats
    first, rest, outside = [], [], []
    proposed = accepted = 0
    for i in range(runs + 1):  # the first run warms up and is not counted
        if i == 1:
            proposed, accepted = stats.proposed_tokens, stats.accepted_tokens
        start = time.perf_counter()
        tokens = gen.iter_tokens(ids, config)
        next(tokens)
        got_first = time.perf_counter()
        inside = gen.model.session_seconds
        count = 1 + sum(1 for _ in tokens)
        end = time.perf_counter()
        if i:
            first.append(got_first - start)
            rest.append((end - got_first) / (count - 1))
            outside.append(1 - (gen.model.session_seconds - inside) / (end - got_first))
    ttft, step = statistics.median(first), statistics.median(rest)
    specs, positions = gen.model.state_specs, prompt_tokens + new_tokens
    kv_bytes = reserved_bytes([t for t in specs if t.kind == "kv"], 1, positions)
    files = directory_size(model_dir)
    return BenchResult(
        prompt_tokens, new_tokens, runs, gen.provider, threads, prompt_tokens / ttft, ttft * 1e3, 1 / step,
        statistics.median(outside), speculation,
        (stats.accepted_tokens - accepted) / (stats.proposed_tokens - proposed) if stats.proposed_tokens > proposed else None,
        peak_rss_mb(), files / 1e6, kv_bytes / 1e6, state_words(specs, 1, positions), adapter,
    )


def as_table(r: BenchResult) -> str:
    rows = [
        ("prompt / new tokens", f"{r.prompt_tokens} / {r.new_tokens}, median of {r.runs} runs, provider {r.provider}"),
        *([("adapter", r.adapter)] if r.adapter else []),
        ("prefill", f"{r.prefill_tokens_per_s:.1f} tokens/s"),
        ("time to first token", f"{r.time_to_first_token_ms:.1f} ms"),
        ("decode", f"{r.decode_tokens_per_s:.1f} tokens/s ({r.python_share:.1%} of each step outside onnxruntime)"),
        ("speculation", r.speculation + ("" if r.acceptance is None else f", {r.acceptance:.0%} of proposed tokens accepted")),
        ("peak resident memory", f"{r.peak_rss_mb:.0f} MB (model files {r.model_files_mb:.0f} MB, {r.state})"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
