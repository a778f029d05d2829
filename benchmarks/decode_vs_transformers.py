"""Decode speed of an lmrt model directory against transformers on PyTorch, same weights.

    python benchmarks/decode_vs_transformers.py MODEL_DIR SOURCE [--new-tokens 128] [--runs 3]

SOURCE is what the directory was exported from (a .gguf file or a Hugging Face directory). Runs
alternate between the two systems; the table reports medians and the ratio. Greedy decoding, a fixed
15-token prompt, end-of-sequence ignored so both generate exactly --new-tokens tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

PROMPT = "Write a short story about a robot who learns to paint in a small village."


def run_lmrt(gen, ids, new_tokens):
    config = gen.config(max_new_tokens=new_tokens, stop_token_ids=[])
    start = time.perf_counter()
    stamps = [time.perf_counter() for _ in gen.iter_tokens(ids, config)]
    return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def run_transformers(model, ids, new_tokens):
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    stamps = Stamps()
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, streamer=stamps, pad_token_id=0,
        )
    t = stamps.times[1:]  # the first put is the prompt
    return t[0] - start, (len(t) - 1) / (t[-1] - t[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("source")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from lmrt import runtime
    from lmrt.export.source import locate

    gen = runtime.Generator(args.model_dir, provider="cpu")
    _, path, extra = locate(args.source)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **extra).eval()
    ids = gen.encode(PROMPT)
    results = {"lmrt": [], "transformers": []}
    run_lmrt(gen, ids, 8)  # warm-up
    run_transformers(model, ids, 8)
    for _ in range(args.runs):
        results["lmrt"].append(run_lmrt(gen, ids, args.new_tokens))
        results["transformers"].append(run_transformers(model, ids, args.new_tokens))

    print(f"{len(ids)}-token prompt, {args.new_tokens} greedy tokens, median of {args.runs} runs, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads\n")
    print("| system | first token (ms) | decode tokens/s |")
    print("|---|---|---|")
    medians = {}
    for name, runs in results.items():
        ttft = statistics.median(r[0] for r in runs) * 1000
        medians[name] = statistics.median(r[1] for r in runs)
        print(f"| {name} | {ttft:.0f} | {medians[name]:.1f} |")
    print(f"\nlmrt / transformers decode speed: {medians['lmrt'] / medians['transformers']:.2f}x")


if __name__ == "__main__":
    main()
