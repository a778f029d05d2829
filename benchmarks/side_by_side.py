"""lmrt side by side with onnxruntime-genai, optimum, transformers and llama.cpp; writes docs/benchmarks.md.

Every system gets the same prompt token ids and generates the same number of greedy tokens, each
measurement in a fresh process (``bench_worker.py``), runs interleaved (run 1 of every system, then
run 2, ...) so that a noisy moment hurts all alike. Reported: medians of time to first token, decode
tokens/s and peak resident memory, and lmrt's ratio to each alternative at the same precision.

Each alternative may live in its own virtual environment (their pins conflict): give its interpreter
with --SYSTEM-python. A system whose model is not given, or whose interpreter cannot import it, is
skipped with a note. Not part of the test suite.

    python benchmarks/side_by_side.py \\
        --lmrt fp32=models/smol-fp32 --lmrt int8=models/smol-int8 --lmrt int4=models/smol-int4 \\
        --genai int8=genai/int8 --genai-python genai-venv/bin/python \\
        --optimum fp32=optimum/fp32 --optimum-python optimum-venv/bin/python \\
        --transformers fp32=hf-dir \\
        --llamacpp int8=smollm2-q8_0.gguf --llamacpp int4=smollm2-q4_1.gguf --llamacpp-python llama-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import date

from report import DOCS, machine, write_section

HERE = os.path.dirname(os.path.abspath(__file__))
SYSTEMS = {  # name -> (label, module its interpreter must import)
    "lmrt": ("lmrt", "lmrt.runtime"),
    "genai": ("onnxruntime-genai", "onnxruntime_genai"),
    "optimum": ("optimum ORTModelForCausalLM", "optimum.onnxruntime"),
    "transformers": ("transformers (PyTorch eager)", "transformers"),
    "llamacpp": ("llama.cpp (llama-cpp-python)", "llama_cpp"),
}
FORMATS = {"llamacpp": {"int8": "Q8_0", "int4": "Q4_1", "fp32": "F32"}}
# The targets: (precision, alternative, lmrt must reach this multiple of its decode speed)
TARGETS = [("int8", "llamacpp", 1.25), ("int4", "llamacpp", 1.2), ("fp32", "optimum", 1.2)]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in SYSTEMS:
        p.add_argument(f"--{name}", action="append", default=[], metavar="PRECISION=PATH", help=f"{name} model to measure")
        p.add_argument(f"--{name}-python", default=sys.executable, metavar="PYTHON", help=f"interpreter for {name}")
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[16, 512], help="one table per prompt length")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--output", default=DOCS, help="the markdown file whose 'decode' section this writes")
    p.add_argument("--json", help="also write the raw results here")
    return p.parse_args()


def prompt_ids(lmrt_dir: str, n: int) -> list[int]:
    """``n`` ids of ordinary prose from the lmrt model's tokenizer (the same ids for every system)."""
    from tokenizers import Tokenizer

    from lmrt.bench import FILLER
    from lmrt.runtime.manifest import load_manifest

    manifest = load_manifest(lmrt_dir)
    tok = Tokenizer.from_file(os.path.join(lmrt_dir, manifest.tokenizer.file))
    ids = tok.encode(FILLER, add_special_tokens=False).ids
    return (ids * (n // len(ids) + 1))[:n]


def available(python: str, module: str) -> str | None:
    """None when ``python`` can import ``module``, else why not (one line)."""
    try:
        done = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
    except OSError as e:
        return str(e)
    return None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["import failed"])[-1]


def measure(python: str, system: str, model: str, ids_file: str, new_tokens: int) -> dict:
    return run_worker(python, "bench_worker.py", system, model, ids_file, str(new_tokens))


def run_worker(python: str, worker: str, *args: str) -> dict:
    """Run ``worker`` (a script beside this one) with ``python``; its last line of output, as JSON."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([python, os.path.join(HERE, worker), *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])}: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    jobs, skipped = [], []
    for system, (label, module) in SYSTEMS.items():
        entries = getattr(args, system)
        if not entries:
            skipped.append(f"{label}: no model given")
            continue
        python = getattr(args, f"{system}_python")
        why = available(python, module)
        if why:
            skipped.append(f"{label}: not installed for {python} ({why})")
            continue
        for entry in entries:
            precision, _, path = entry.partition("=")
            if not os.path.exists(path):
                skipped.append(f"{label} {precision}: {path} not found")
                continue
            jobs.append((system, precision, path, python))
    lmrt_dirs = [path for system, _, path, _ in jobs if system == "lmrt"]
    if not lmrt_dirs:
        sys.exit("give at least one lmrt model directory (--lmrt fp32=DIR)")

    tables = []
    for length in args.prompt_tokens:
        results: dict[tuple[str, str], list[dict]] = {}
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(prompt_ids(lmrt_dirs[0], length), f)
        try:
            for run in range(args.runs):
                for system, precision, path, python in jobs:
                    print(f"{length}-token prompt, run {run + 1}/{args.runs}: {system} {precision}", file=sys.stderr, flush=True)
                    try:
                        results.setdefault((system, precision), []).append(measure(python, system, path, f.name, args.new_tokens))
                    except RuntimeError as e:
                        print(f"  failed: {e}", file=sys.stderr)
        finally:
            os.unlink(f.name)
        tables.append((length, summarize(results)))

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    write_section("decode", report(tables, skipped, args), args.output)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({str(n): {f"{s} {p}": v for (s, p), v in t.items()} for n, t in tables}, out, indent=2)
    print(f"wrote {args.output}", file=sys.stderr)


def summarize(results: dict) -> dict:
    out = {}
    for key, runs in results.items():
        out[key] = {
            "runs": len(runs),
            "ttft_ms": statistics.median(r["ttft_s"] for r in runs) * 1e3,
            "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
            "first_tokens": runs[0]["first_tokens"],
            "versions": runs[0]["versions"],
        }
    return out


def _name(system: str, precision: str) -> str:
    fmt = FORMATS.get(system, {}).get(precision)
    return f"{SYSTEMS[system][0]} {precision}" + (f" ({fmt})" if fmt else "")


def report(tables: list[tuple[int, dict]], skipped: list[str], args) -> str:
    lines = [
        "## One stream: decode speed and time to first token",
        "",
        f"SmolLM2-135M-Instruct, {args.new_tokens} greedy new tokens after the prompt; median of {args.runs} "
        "interleaved runs, each in a fresh process after a short warm-up. Decode speed counts the tokens "
        "after the first; time to first token includes reading the prompt. Written by "
        "`benchmarks/side_by_side.py`.",
        "",
        f"Machine: {machine()}. Measured {date.today().isoformat()}.",
    ]
    for length, summary in tables:
        lines += [
            "",
            f"### {length}-token prompt",
            "",
            "| system | time to first token (ms) | decode (tokens/s) | peak memory (MB) | lmrt decode ÷ this | lmrt time to first token |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for (system, precision), r in summary.items():
            mine = summary.get(("lmrt", precision))
            ratio = ttft = "–"
            if mine and system != "lmrt":
                ratio = f"{mine['decode_tokens_per_s'] / r['decode_tokens_per_s']:.2f}×"
                ttft = f"{r['ttft_ms'] / mine['ttft_ms']:.2f}× faster" if mine["ttft_ms"] <= r["ttft_ms"] else f"{mine['ttft_ms'] / r['ttft_ms']:.2f}× slower"
            lines.append(
                f"| {_name(system, precision)} | {r['ttft_ms']:.0f} | {r['decode_tokens_per_s']:.1f} | "
                f"{r['peak_rss_mb']:.0f} | {ratio} | {ttft} |"
            )
        lines += ["", "Targets:", ""]
        for precision, other, goal in TARGETS:
            mine, theirs = summary.get(("lmrt", precision)), summary.get((other, precision))
            if mine and theirs:
                got = mine["decode_tokens_per_s"] / theirs["decode_tokens_per_s"]
                verdict = "met" if got >= goal else "not met"
                lines.append(f"- {precision} decode ≥ {goal}× {_name(other, precision)}: {got:.2f}× ({verdict})")
        for precision in ("int8", "int4"):
            mine, theirs = summary.get(("lmrt", precision)), summary.get(("llamacpp", precision))
            if mine and theirs:
                verdict = "met" if mine["ttft_ms"] <= theirs["ttft_ms"] else "not met"
                lines.append(
                    f"- {precision} time to first token ≤ {_name('llamacpp', precision)}'s: "
                    f"{mine['ttft_ms']:.0f} ms against {theirs['ttft_ms']:.0f} ms ({verdict})"
                )
        reference = summary.get(("lmrt", "fp32"))
        if reference:
            n = len(reference["first_tokens"])
            agree = []
            for (system, precision), r in summary.items():
                if (system, precision) != ("lmrt", "fp32"):
                    same = sum(1 for a, b in zip(r["first_tokens"], reference["first_tokens"]) if a == b)
                    agree.append(f"{_name(system, precision)} {same}/{n}")
            lines += ["", f"Same greedy token as lmrt fp32 at each of the first {n} positions: " + "; ".join(agree) + "."]
    lines += ["", "### Versions", ""]
    versions: dict[str, set] = {}
    for _, summary in tables:
        for (system, _), r in summary.items():
            for package, version in r["versions"].items():
                versions.setdefault(f"{package} {version}", set()).add(SYSTEMS[system][0])
    lines += [f"- {k} (for {', '.join(sorted(v))})" for k, v in sorted(versions.items())]
    if skipped:
        lines += ["", "### Skipped", ""] + [f"- {s}" for s in skipped]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
