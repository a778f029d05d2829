"""What batching and beam search cost, on one exported model directory.

    python benchmarks/batching.py models/smollm2 [--prompts 8] [--new-tokens 64] [--runs 3]

Generates ``--new-tokens`` greedy tokens (stop tokens ignored) for ``--prompts`` prompts of
different lengths, first one prompt at a time, then as one batch, and reports generated
tokens per second for each; then the time of beam search (2 and 4 beams) relative to greedy on one
prompt. Medians of ``--runs`` interleaved runs. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

from lmrt import runtime

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):",
    "The three most important inventions of the twentieth century are",
    "Water boils at",
    "In a recent interview, the author explained that her new novel",
    "To make bread you need",
    "The difference between a virus and a bacterium is that",
]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()

    gen = runtime.Generator(args.model_dir, threads=args.threads)
    prompts = (PROMPTS * (args.prompts // len(PROMPTS) + 1))[: args.prompts]
    options = dict(max_new_tokens=args.new_tokens, stop_token_ids=[])
    total = args.new_tokens * len(prompts)
    cases = {
        "one prompt at a time": lambda: [gen.generate(p, **options) for p in prompts],
        f"one batch of {len(prompts)}": lambda: gen.generate_batch(prompts, **options),
        "greedy, 1 prompt": lambda: gen.generate(prompts[0], **options),
        "beam search, 2 beams": lambda: gen.generate(prompts[0], num_beams=2, **options),
        "beam search, 4 beams": lambda: gen.generate(prompts[0], num_beams=4, **options),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.runs):
        for name, fn in cases.items():
            times[name].append(timed(fn))
    median = {name: statistics.median(t) for name, t in times.items()}

    print(f"{args.model_dir}: {len(prompts)} prompts x {args.new_tokens} new tokens, median of {args.runs} runs\n")
    print("| run | seconds | generated tokens/s | vs first row |")
    print("|---|---|---|---|")
    base = median["one prompt at a time"]
    for name in list(cases)[:2]:
        print(f"| {name} | {median[name]:.2f} | {total / median[name]:.1f} | {base / median[name]:.2f}x |")
    greedy = median["greedy, 1 prompt"]
    print("\n| run (1 prompt) | seconds | vs greedy |")
    print("|---|---|---|")
    for name in list(cases)[2:]:
        print(f"| {name} | {median[name]:.2f} | {median[name] / greedy:.2f}x the time |")


if __name__ == "__main__":
    main()
