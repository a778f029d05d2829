"""One cell row of the onnxruntime matrix: run inside an environment with one onnxruntime release,
load each model directory given, and write what it did to OUT (JSON, plus .npy logits).

For each directory: a directory needing a newer onnxruntime must be refused with lmrt's one-line
error naming both versions; any other must load and generate greedily (the runtime's default path,
speculation included), and score a fixed token sequence (teacher forcing) so the caller compares
logits, not only tokens, with a reference run; and its perplexity on the first tokens of the
quality gate's evaluation text, so a quantized directory's gate can be checked under this release.

    python scripts/compat_worker.py OUT MODEL_DIR... [--forced TOKENS_JSON]
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

SCORED_TOKENS = int(os.environ.get("LMRT_COMPAT_SCORED_TOKENS", 1024))  # of the gate's text (0: no perplexity)
PROMPT = "The capital of France is Paris. The three most visited cities in Europe are"
NEW_TOKENS = 24


def run(model_dir: str, out: str, forced: list[int] | None) -> dict:
    import onnxruntime

    from lmrt import runtime
    from lmrt.runtime.compat import CompatError, required

    have = onnxruntime.__version__
    need = required(runtime.load_manifest(model_dir))
    name = os.path.basename(model_dir.rstrip("/"))
    row = {"model": name, "onnxruntime": have, "needs": need}
    try:
        gen = runtime.Generator(model_dir, provider="cpu")
    except CompatError as e:
        row.update(loaded=False, error=str(e))
        return row
    except Exception as e:  # anything else is a failure of the cell, reported as such
        row.update(loaded=False, error=f"{type(e).__name__}: {e}")
        return row
    row["loaded"] = True
    ids = gen.encode(PROMPT)
    started = time.perf_counter()
    try:
        tokens = list(gen.iter_tokens(ids, gen.config(max_new_tokens=NEW_TOKENS, stop_token_ids=())))
    except Exception as e:
        row.update(generated=False, error=f"{type(e).__name__}: {e}")
        return row
    row.update(generated=True, tokens=tokens, text=gen.decode(tokens), seconds=time.perf_counter() - started)
    sequence = ids + (forced if forced is not None else tokens)
    logits = gen.model.sequence_logits(sequence)[len(ids) - 1 : -1]  # predicting each new token
    np.save(os.path.join(out, f"{name}.npy"), logits.astype(np.float32))
    from lmrt.quantize.evaltext import reference_text
    from lmrt.runtime.scoring import score_ids

    if SCORED_TOKENS:
        text_ids = gen.encode(reference_text())[:SCORED_TOKENS]
        row["perplexity"] = score_ids(gen.model, text_ids).perplexity
    return row


def main(argv: list[str]) -> None:
    out, dirs, forced = argv[0], argv[1:], None
    if "--forced" in dirs:
        i = dirs.index("--forced")
        with open(dirs[i + 1]) as f:
            forced = json.load(f)
        dirs = dirs[:i] + dirs[i + 2 :]
    os.makedirs(out, exist_ok=True)
    rows = []
    for d in dirs:
        tokens = forced.get(os.path.basename(d.rstrip("/"))) if forced else None
        rows.append(run(d, out, tokens))
    with open(os.path.join(out, "rows.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
