"""Soak: does one process's memory stay put over a long generation and many requests? Writes the
"soak" section of docs/benchmarks.md.

1. One generation of --long-tokens tokens: resident memory every --every tokens, from the first
   --every (the warm-up: onnxruntime's first allocations, the code first run) on, against what its
   KV cache wrote meanwhile (the cache is allocated at the start and its pages are touched as
   positions are written, so memory should grow by the cache's growth and nothing else).
2. --requests short requests one after another (greedy and seeded sampling alternately, streamed
   and not): resident memory after each, which after a warm-up should stay within one request's KV
   cache of where it was.

    python benchmarks/soak.py models/smol-int8
"""

from __future__ import annotations

import argparse
import sys
from datetime import date

from report import machine, write_section

PROMPT = "Write a long story about a lighthouse keeper and the ships that pass her light, season after season."


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--long-tokens", type=int, default=5000)
    p.add_argument("--every", type=int, default=500)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--output", default=None)
    args = p.parse_args()
    from lmrt.runtime import Generator

    gen = Generator(args.model)
    per_position = gen.model.bytes_per_position
    prompt = gen.chat_prompt([{"role": "user", "content": PROMPT}])

    # 1. one long generation (end-of-sequence ignored, so it runs its whole length)
    start, curve = None, []
    config = gen.config(max_new_tokens=args.long_tokens, stop_token_ids=[], temperature=0.8, top_p=0.95, seed=1)
    for n, _ in enumerate(gen.iter_tokens(prompt, config), 1):
        if n % args.every == 0:
            start = rss() if start is None else start
            curve.append((n, rss() - start))
            print(f"{n} tokens: +{(rss() - start) / 1e6:.1f} MB", file=sys.stderr, flush=True)

    # 2. many short requests
    base, samples = None, []
    for i in range(args.requests):
        options = dict(max_new_tokens=32) if i % 2 else dict(max_new_tokens=32, temperature=0.9, seed=i)
        text = f"Request {i}: name a colour and an animal."
        if i % 3:
            gen.generate(gen.chat_prompt([{"role": "user", "content": text}]), **options)
        else:
            "".join(gen.stream(gen.chat_prompt([{"role": "user", "content": text}]), **options))
        if i + 1 == args.warmup:
            base = rss()
        if base is not None and (i + 1) % 20 == 0:
            samples.append((i + 1, rss() - base))
    one_request = per_position * (len(prompt) + 32 + 32)
    markdown = report(args, curve, per_position, len(prompt), samples, one_request)
    write_section("soak", markdown, *([args.output] if args.output else []))
    print(markdown)


def report(args, curve, per_position, prompt_len, samples, one_request) -> str:
    mb = 1e6
    lines = [
        "## Soak: one process, a long generation and many requests",
        "",
        f"Model `{args.model}`. Written by `benchmarks/soak.py`. Machine: {machine()}. Measured {date.today().isoformat()}.",
        "",
        f"One generation of {args.long_tokens} tokens (a {prompt_len}-token prompt, sampling, end-of-sequence ignored): resident "
        f"memory above where it was after {args.every} tokens, against the KV cache written since.",
        "",
        "| tokens | resident memory growth (MB) | KV cache written since (MB) |",
        "|---:|---:|---:|",
    ]
    first = curve[0][0]
    for n, grew in curve:
        lines.append(f"| {n} | {grew / mb:.1f} | {per_position * (n - first) / mb:.1f} |")
    final_growth = curve[-1][1]
    kv_total = per_position * (curve[-1][0] - first)
    lines += [
        "",
        f"Growth {final_growth / mb:.1f} MB against {kv_total / mb:.1f} MB of cache "
        f"({'within' if final_growth <= kv_total else 'beyond'} the cache's growth).",
        "",
        f"{args.requests} short requests one after another (32 new tokens each, greedy and sampled, streamed and not): resident "
        f"memory above where it was after {args.warmup} requests.",
        "",
        "| requests | growth (MB) |",
        "|---:|---:|",
    ]
    lines += [f"| {n} | {grew / mb:+.1f} |" for n, grew in samples]
    worst = max((g for _, g in samples), default=0)
    lines += [
        "",
        f"Largest growth {worst / mb:+.1f} MB; one request's cache is {one_request / mb:.1f} MB "
        f"({'within' if worst <= one_request else 'beyond'} it).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
