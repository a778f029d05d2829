"""Size, perplexity and decode speed of exported model directories, side by side.

    python benchmarks/quantization.py models/smollm2 models/smollm2-int8 models/smollm2-int4

For each directory: the size on disk, perplexity on the quality gate's evaluation text (the first
2,048 tokens of Python's reference manual, scored by lmrt's runtime), and greedy decode speed
(tokens/s after the first token, 128 new tokens from a 16-token prompt, median of ``--runs``
interleaved runs). Prints a Markdown table with ratios to the first directory.
"""

from __future__ import annotations

import argparse
import os
import statistics

from lmrt import runtime
from lmrt.atomic import directory_size
from lmrt.quantize.evaltext import reference_text
from timing import steady_decode_speed

PROMPT = "The history of the printing press begins in the fifteenth century, when"


def decode_speed(gen: runtime.Generator, new_tokens: int) -> float:
    return steady_decode_speed(gen, gen.encode(PROMPT)[:16], gen.config(max_new_tokens=new_tokens, stop_token_ids=[]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()

    gens = {d: runtime.Generator(d, provider="cpu", threads=args.threads) for d in args.dirs}
    text = reference_text()
    ppl = {d: g.score(g.encode(text)[: args.eval_tokens]).perplexity for d, g in gens.items()}
    speeds = {d: [] for d in args.dirs}
    for _ in range(args.runs):  # interleaved, so a slow moment of the machine hits every model
        for d, g in gens.items():
            speeds[d].append(decode_speed(g, args.tokens))

    base = args.dirs[0]
    print("| model | size (MB) | perplexity | vs first | decode tokens/s | vs first |")
    print("|---|---|---|---|---|---|")
    for d in args.dirs:
        size, speed = directory_size(d) / 1e6, statistics.median(speeds[d])
        print(
            f"| {os.path.basename(d.rstrip('/'))} | {size:.0f} | {ppl[d]:.3f} | {ppl[d] / ppl[base] - 1:+.2%} "
            f"| {speed:.1f} | {speed / statistics.median(speeds[base]):.2f}× |"
        )


if __name__ == "__main__":
    main()
