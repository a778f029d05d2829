"""The onnxruntime matrix: each release in its own environment, the tiny-model fidelity tests and a
real model's generation against graphs exported for each profile.

    .venv/bin/python scripts/compat_matrix.py --models .compat-envs/models/smollm2-*  [--versions 1.18.1,1.20.1]

For each onnxruntime release an environment is made under .compat-envs/ort-VERSION (inside the
repository, ignored by git) holding only that onnxruntime (and numpy where the release needs an
older one); everything else (lmrt itself, torch and transformers for the tests' references) comes
from the running environment through a .pth file. In each environment:

  1. tests/test_fidelity.py and tests/test_compat.py: the tiny models are exported there, so for the
     profile of that release (the default target), and compared with transformers;
  2. scripts/compat_worker.py over each model directory given: a directory needing a newer release
     must be refused with lmrt's one-line error; any other must generate, and its logits over the
     reference run's tokens (teacher forcing) are compared with the reference run's, made here
     with the running environment's onnxruntime.

Prints a markdown table (model directory x release) and writes .compat-envs/matrix.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENVS = os.path.join(ROOT, ".compat-envs")
DEFAULT_VERSIONS = ["1.18.1", "1.19.2", "1.20.1", "1.22.1", "1.23.2", "1.24.4"]
EXTRA = {}  # release -> packages its wheel needs beside it, e.g. {"1.17.3": ["numpy<2"]}
LOGIT_TOLERANCE = 1e-3  # relative to the largest logit, between releases on the same graph
NEAR_TIE = 0.05  # a greedy choice whose top-2 logits are closer than this (in logit units) may flip


def environment(version: str) -> str:
    """The environment for onnxruntime ``version`` (made once); returns its python."""
    env = os.path.join(ENVS, f"ort-{version}")
    python = os.path.join(env, "bin", "python")
    if os.path.exists(os.path.join(env, ".ready")):
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", env], check=True)
    subprocess.run(
        [python, "-m", "pip", "install", "-q", f"onnxruntime=={version}", *EXTRA.get(version, [])], check=True
    )  # fmt: skip
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True, capture_output=True, text=True
    ).stdout.strip()
    with open(os.path.join(site, "zz_lmrt_parent.pth"), "w") as f:  # after the environment's own packages
        f.write(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    open(os.path.join(env, ".ready"), "w").close()
    return python


def run_tests(python: str) -> str:
    """The closing line of the fidelity and compatibility tests under ``python``."""
    env = {k: v for k, v in os.environ.items() if k != "LMRT_REQUIRE_REAL_MODEL"}
    result = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fidelity.py", "tests/test_compat.py"],
        cwd=ROOT, capture_output=True, text=True, env=env,
    )  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    failed = [line for line in lines if line.startswith("FAILED")]
    return "; ".join(failed + lines[-1:]) if lines else result.stderr.strip().splitlines()[-1]


def run_worker(python: str, out: str, models: list[str], forced: str | None = None) -> list[dict]:
    cmd = [python, os.path.join(ROOT, "scripts", "compat_worker.py"), out, *models]
    if forced:
        cmd += ["--forced", forced]
    subprocess.run(cmd, check=True, cwd=ROOT)
    with open(os.path.join(out, "rows.json")) as f:
        return json.load(f)


def int8_compute(model_dir: str) -> float | None:
    """The quality gate's allowed perplexity increase of a directory whose MatMulNBits compute in
    int8 (accuracy level 4: each release's kernels round differently); None for float compute."""
    with open(os.path.join(model_dir, "lmrt.json")) as f:
        m = json.load(f)
    forms = (m.get("requires") or {}).get("forms", {})
    fused = any(f.startswith("MatMulNBits") and not f.endswith(".fallback") for f in forms)
    if fused and (m.get("quantization") or {}).get("compute", "int8") == "int8":
        return m["quality"]["max_increase"]
    return None


def judge(row: dict, ref: dict, out: str, ref_out: str, fp32: dict | None = None, gate: float | None = None) -> tuple[bool, str]:
    """(passed, cell text) of one model under one release, against the reference run. Float graphs:
    logits within LOGIT_TOLERANCE of the reference and the same greedy tokens (or a flip at a near
    tie). int8-compute graphs: their quality gate holds under this release (perplexity against the
    fp32 directory's under the same release, ``fp32``'s row), and the same tokens or a near-tie flip."""
    from lmrt.runtime.compat import at_least

    if row["needs"] and not at_least(row["onnxruntime"], row["needs"]):
        ok = not row["loaded"] and f"needs onnxruntime {row['needs']}" in row["error"] and row["onnxruntime"] in row["error"]
        return ok, f"refused (needs {row['needs']})" if ok else f"FAIL: {row.get('error') or 'loaded'}"
    if not row.get("generated"):
        return False, f"FAIL: {row.get('error', '?')[:120]}"
    got, want = np.load(os.path.join(out, row["model"] + ".npy")), np.load(os.path.join(ref_out, ref["model"] + ".npy"))
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    same = next((i for i, (a, b) in enumerate(zip(row["tokens"], ref["tokens"])) if a != b), len(ref["tokens"]))
    if gate is None:
        close, quality = rel < LOGIT_TOLERANCE, f"Δlogits {rel:.0e}"
    elif "perplexity" not in row:  # not measured (arm64_qemu.sh: too slow emulated): tokens only
        close, quality = True, f"perplexity not measured, Δlogits {rel:.0e}"
    else:
        increase = row["perplexity"] / fp32["perplexity"] - 1 if fp32 and fp32.get("perplexity") else float("inf")
        close, quality = increase <= gate, f"ppl {increase:+.2%} vs fp32 (gate +{gate:.0%}), Δlogits {rel:.0e}"
    if same == len(ref["tokens"]):
        return close, f"{same}/{same} tokens, {quality}"
    top2 = np.sort(want[same])[-2:]
    margin = float(top2[1] - top2[0])
    ok = close and margin < NEAR_TIE
    return ok, f"{same}/{len(ref['tokens'])} tokens, then a near tie (margin {margin:.3f}), {quality}"


def compare(out: str, models_root: str) -> None:
    with open(os.path.join(out, "rows.json")) as f:
        rows = json.load(f)
    fp32 = next((r for r in rows if r["model"].endswith("fp32")), None)
    failed = []
    for row in rows:
        ref_out = os.path.join(ENVS, "results", f"reference-{row['onnxruntime']}")
        with open(os.path.join(ref_out, "rows.json")) as f:
            ref = next(r for r in json.load(f) if r["model"] == row["model"])
        ok, text = judge(row, ref, out, ref_out, fp32, int8_compute(os.path.join(models_root, row["model"])))
        print(f"{row['model']}: {'ok' if ok else 'FAILED'} {text}; greedy tokens {'equal' if row.get('tokens') == ref['tokens'] else 'differ'}")
        failed += [] if ok else [row["model"]]
    sys.exit(f"failed: {failed}" if failed else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", default=",".join(DEFAULT_VERSIONS), help="onnxruntime releases, comma-separated")
    parser.add_argument("--models", nargs="*", default=[], help="model directories (exported with --target ...)")
    parser.add_argument("--no-tests", action="store_true", help="skip the tiny-model tests")
    parser.add_argument("--compare", metavar="DIR", help="only judge a worker's results in DIR (e.g. arm64_qemu.sh's) "
                        "against this machine's reference run of the same onnxruntime release")
    args = parser.parse_args()
    import onnxruntime

    from lmrt.runtime.compat import profile_for

    if args.compare:
        return compare(args.compare, os.path.dirname(os.path.abspath(args.models[0])) if args.models else os.path.join(ENVS, "models"))

    os.makedirs(ENVS, exist_ok=True)
    models = [os.path.abspath(m) for m in args.models]
    ref_out = os.path.join(ENVS, "results", f"reference-{onnxruntime.__version__}")
    refs = {r["model"]: r for r in run_worker(sys.executable, ref_out, models)} if models else {}
    forced = os.path.join(ref_out, "forced.json")
    if models:
        with open(forced, "w") as f:
            json.dump({name: r.get("tokens") for name, r in refs.items()}, f)

    results: dict = {"reference": onnxruntime.__version__, "versions": {}}
    for version in args.versions.split(","):
        python = environment(version)
        entry: dict = {"models": {}}
        if not args.no_tests:
            try:
                profile_for(version)
                entry["tests"] = run_tests(python)
            except ValueError as e:  # no profile: lmrt refuses this release (the worker shows how)
                entry["tests"] = f"not run: {e}"
        if models:
            out = os.path.join(ENVS, "results", version)
            rows = run_worker(python, out, models, forced)
            fp32 = next((r for r in rows if r["model"].endswith("fp32")), None)
            for row, path in zip(rows, models):
                ok, text = judge(row, refs[row["model"]], out, ref_out, fp32, int8_compute(path))
                entry["models"][row["model"]] = {"passed": ok, "cell": text, "row": row}
        results["versions"][version] = entry
        print(f"onnxruntime {version}: {entry.get('tests', '')}", flush=True)
        for name, cell in entry["models"].items():
            print(f"  {name}: {'ok' if cell['passed'] else 'FAILED'} {cell['cell']}", flush=True)

    with open(os.path.join(ENVS, "matrix.json"), "w") as f:
        json.dump(results, f, indent=1)
    versions = list(results["versions"])
    print("\n| model directory | " + " | ".join(f"ort {v}" for v in versions) + " |")
    print("|---|" + "---|" * len(versions))
    if not args.no_tests:
        print("| tiny-model tests | " + " | ".join(results["versions"][v]["tests"] for v in versions) + " |")
    for m in models:
        name = os.path.basename(m)
        print(f"| {name} | " + " | ".join(results["versions"][v]["models"][name]["cell"] for v in versions) + " |")
    failed = [(v, n) for v, e in results["versions"].items() for n, c in e["models"].items() if not c["passed"]]
    failed += [(v, "tests") for v, e in results["versions"].items() if "failed" in e.get("tests", "") or "error" in e.get("tests", "")]
    sys.exit(f"failed: {failed}" if failed else 0)


if __name__ == "__main__":
    main()
