"""Where the memory of `lmrt generate` goes, and what each of the runtime's memory measures saves;
writes the "memory" section of docs/benchmarks.md.

Each measurement is a fresh process (peak resident set size, as the kernel counts it): Python with
numpy, onnxruntime and tokenizers imported; then the tokenizer loaded; the session created; the
weight file's pages released; and a generation of --new-tokens tokens after a --prompt-tokens prompt.
Variants turn one measure off at a time (the heap trim, the release of the weight file's pages) or
change the prefill chunk, so each one's effect is measured, not assumed. The target is peak <= the
model's files + its KV cache + 100 MB.

    python benchmarks/memory.py models/smol-int8 models/smol-int4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import date

from report import machine, write_section

WORKER = r"""
import json, resource, sys
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model_dir, variant, chunk, prompt_tokens, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
import numpy, onnxruntime, tokenizers
out = {"imports": rss()}
from lmrt.runtime import memory
if variant == "no-trim":
    memory.trim_heap = lambda: None
if variant == "no-release":
    memory.release_file_pages = lambda path: 0
import lmrt.runtime.generator as G
G.trim_heap, G.settle_memory = memory.trim_heap, memory.settle_memory
from lmrt.runtime.manifest import load_manifest, load_tokenizer
manifest = load_manifest(model_dir)
load_tokenizer(model_dir, manifest)
out["tokenizer"] = rss()
gen = G.Generator(model_dir, prefill_chunk=chunk)
out["loaded"], out["load_peak"] = rss(), peak()
from lmrt.bench import prompt_ids
config = gen.config(max_new_tokens=new_tokens, stop_token_ids=[], temperature=0.0, speculation="off")
n = sum(1 for _ in gen.iter_tokens(prompt_ids(gen, prompt_tokens), config))
out["generated"], out["peak"], out["tokens"] = rss(), peak(), n
print(json.dumps(out))
"""
VARIANTS = [("default", "the runtime as it is"), ("no-release", "without releasing the weight file's pages"),
            ("no-trim", "without trimming the heap")]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--chunks", type=int, nargs="+", default=[512, 256, 128])
    p.add_argument("--output", default=None)
    args = p.parse_args()
    from lmrt.atomic import directory_size
    from lmrt.runtime import load_manifest
    from lmrt.runtime.state_buffers import bytes_per_position
    from lmrt.runtime.state_spec import state_of

    base = measure_imports()
    rows = []
    for model_dir in args.models:
        m = load_manifest(model_dir)
        files = directory_size(model_dir)
        kv = bytes_per_position(state_of(m)) * (args.prompt_tokens + args.new_tokens)
        runs = [(v, what, 256) for v, what in VARIANTS] + [("default", f"prefill chunk {c}", c) for c in args.chunks if c != 256]
        for variant, what, chunk in runs:
            print(f"{model_dir}: {what}", file=sys.stderr, flush=True)
            r = run(model_dir, variant, chunk, args)
            rows.append((model_dir, m, files, kv, what, r))
    markdown = report(base, rows, args)
    write_section("memory", markdown, *([args.output] if args.output else []))
    print(markdown)


def measure_imports() -> int:
    code = "import numpy, onnxruntime, tokenizers, resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def run(model_dir: str, variant: str, chunk: int, args) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", WORKER, model_dir, variant, str(chunk), str(args.prompt_tokens), str(args.new_tokens)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(base: int, rows, args) -> str:
    mb = 1e6
    lines = [
        "## Memory of one generation",
        "",
        f"Peak resident memory of a fresh process that loads the model and generates {args.new_tokens} tokens after a "
        f"{args.prompt_tokens}-token prompt (greedy, speculation off), as the kernel counts it. Python with numpy, "
        f"onnxruntime and tokenizers imported, before any model: {base / mb:.0f} MB. Written by `benchmarks/memory.py`.",
        "",
        f"Machine: {machine()}. Measured {date.today().isoformat()}.",
        "",
        "| model | variant | after the tokenizer | loading peak | loaded | peak | files + KV + 100 MB | over |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model_dir, m, files, kv, what, r in rows:
        target = files + kv + 100 * mb
        name = f"{m.quantization.get('name', m.graph.dtype)}"
        lines.append(
            f"| {name} | {what} | {r['tokenizer'] / mb:.0f} | {r['load_peak'] / mb:.0f} | {r['loaded'] / mb:.0f} | "
            f"{r['peak'] / mb:.0f} | {target / mb:.0f} ({files / mb:.0f} + {kv / mb:.1f} + 100) | {(r['peak'] - target) / mb:+.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
