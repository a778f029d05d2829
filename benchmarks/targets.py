"""The speed cost of each export profile's fallbacks: the same model quantized for several --target
profiles, each measured with `lmrt bench` in its own process (so peak memory is its own), on the
installed onnxruntime; writes the "targets" section of docs/benchmarks.md.

    python benchmarks/targets.py int8=models/smol-int8 int8@ort-1.22=models/smol-int8-122 \\
        int8@ort-1.18=models/smol-int8-118 int4=... --baseline int8=int8 --baseline int8@ort-1.22=int8 ...

Each LABEL=DIR is one row; a row is compared with the first row of the same precision (its fused
form). The directories are measured in turn, --rounds times over (interleaved, so a change in the
machine's load falls on all of them), and each figure is the median over the rounds. Perplexity
comes from each directory's quality gate record.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from datetime import date

from report import ROOT, machine, write_section


def bench(model_dir: str, args) -> dict:
    cmd = [sys.executable, "-m", "lmrt", "bench", model_dir, "--json", "--runs", str(args.runs),
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", metavar="LABEL=DIR")
    parser.add_argument("--runs", type=int, default=3, help="measured runs per process")
    parser.add_argument("--rounds", type=int, default=3, help="processes per directory, interleaved")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    import onnxruntime

    items = [item.partition("=")[::2] for item in args.models]
    measured: dict[str, list[dict]] = {label: [] for label, _ in items}
    for _ in range(args.rounds):
        for label, path in items:
            measured[label].append(bench(path, args))
    rows, fused = [], {}
    for label, path in items:
        with open(os.path.join(path, "lmrt.json")) as f:
            m = json.load(f)
        r = {k: statistics.median(x[k] for x in measured[label]) for k in ("model_files_mb", "peak_rss_mb", "prefill_tokens_per_s", "decode_tokens_per_s")}
        precision = (m.get("quantization") or {}).get("name", "fp32")
        fused.setdefault(precision, r)
        base = fused[precision]
        req = m.get("requires") or {}
        fallbacks = [f[: -len(".fallback")] for f in req.get("forms", {}) if f.endswith(".fallback")]
        q = m.get("quality") or {}
        ppl = f"{q['increase']:+.2%}" if q else "—"
        rows.append(
            f"| {label} | {req.get('target', '?')} | {req.get('onnxruntime', '?')} | {', '.join(fallbacks) or 'none'} "
            f"| {r['model_files_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['prefill_tokens_per_s']:.0f} "
            f"| {r['decode_tokens_per_s']:.1f} | {r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}× "
            f"| {ppl} |"
        )
        print(rows[-1], flush=True)
    table = "\n".join(
        [
            "| directory | target | needs onnxruntime | plain-operator fallbacks | files MB | peak RSS MB "
            "| prefill tok/s | decode tok/s | decode vs fused | perplexity vs fp32 |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    write_section(
        "targets",
        f"""## Export profiles: the cost of the fallbacks

`benchmarks/targets.py`, {date.today().isoformat()}: {machine()}; onnxruntime {onnxruntime.__version__}.
`lmrt bench` per directory in its own process ({args.prompt_tokens}-token prompt, {args.new_tokens} new tokens,
greedy, median of {args.runs} runs after a warm-up), {args.rounds} processes per directory interleaved; medians. "decode vs fused" compares with the first row of the
same precision. The fallback for 8-bit `MatMulNBits` dequantizes the 8-bit codes with plain operators,
which onnxruntime folds into float matrices when the session starts: the files keep 8 bits, memory and
speed are those of float weights, and the products are computed in float (so perplexity is as with
`--compute float`). While it folds, memory peaks at several times the float weights (peak RSS below;
once the session has started, the process holds about what an fp32 directory does). The fallback for 8-bit `GatherBlockQuantized` gathers the codes and dequantizes
the few rows a step needs.

{table}
""",
    )


if __name__ == "__main__":
    main()
