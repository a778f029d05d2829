"""One measurement of one embedding system, in a process of its own; ``encoders.py`` runs it.

    python encoder_worker.py SYSTEM MODEL TEXTS_JSON REPEATS

SYSTEM is lmrt, sentence-transformers or optimum; MODEL the path that system loads (an lmrt model
directory, the sentence-transformers directory, or optimum's exported ONNX directory). For batch 1
and for batch 32, after one warm-up pass, it embeds all the texts REPEATS times and keeps the
median speed. It prints one JSON line: sentences/s per batch size, peak resident memory, the
embeddings of the first texts (to compare systems) and the versions involved. Only the system's own
packages are imported, so it runs in that system's environment.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time

BATCHES = (1, 32)
KEPT = 32  # embeddings sent back for the comparison


def peak_rss_mb() -> float:
    """This program's peak resident memory: VmHWM starts afresh at exec, while getrusage's maximum
    carries over the parent's (which exported models before starting this)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1e3  # KiB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # KiB on Linux


def load_lmrt(model):
    import onnxruntime

    from lmrt import __version__, runtime

    encoder = runtime.Encoder(model, provider="cpu")
    return (lambda texts, batch: encoder.embed(texts, batch_size=batch)), {
        "lmrt": __version__, "onnxruntime": onnxruntime.__version__,
    }  # fmt: skip


def load_sentence_transformers(model):
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model, device="cpu")

    def embed(texts, batch):
        return st.encode(texts, batch_size=batch, convert_to_numpy=True)  # the model's own Normalize applies

    return embed, {"sentence-transformers": sentence_transformers.__version__, "torch": torch.__version__}


def load_optimum(model):
    """optimum's ONNX model and the pooling users write around it: mean over the unpadded tokens,
    then L2 normalization, in numpy."""
    import numpy as np
    import onnxruntime
    import optimum.onnxruntime
    from optimum.onnxruntime import ORTModelForFeatureExtraction
    from transformers import AutoTokenizer

    ort_model = ORTModelForFeatureExtraction.from_pretrained(model, provider="CPUExecutionProvider")
    tokenizer = AutoTokenizer.from_pretrained(model)

    def embed(texts, batch):
        out = []
        for i in range(0, len(texts), batch):
            inputs = tokenizer(texts[i : i + batch], padding=True, truncation=True, max_length=256, return_tensors="np")
            hidden = ort_model(**inputs).last_hidden_state
            mask = inputs["attention_mask"][..., None].astype(hidden.dtype)
            pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
            out.append(pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12))
        return np.concatenate(out)

    version = getattr(optimum.onnxruntime, "__version__", None) or _version("optimum-onnx")
    return embed, {"optimum-onnx": version, "onnxruntime": onnxruntime.__version__}


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


LOADERS = {"lmrt": load_lmrt, "sentence-transformers": load_sentence_transformers, "optimum": load_optimum}


def main() -> None:
    system, model, texts_file, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    with open(texts_file, encoding="utf-8") as f:
        texts = json.load(f)
    embed, versions = LOADERS[system](model)
    speeds = {}
    for batch in BATCHES:
        embed(texts[: max(batch, 8)], batch)  # warm-up
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            embed(texts, batch)
            runs.append(len(texts) / (time.perf_counter() - start))
        speeds[str(batch)] = statistics.median(runs)
    kept = embed(texts[:KEPT], 32)
    print(json.dumps({
        "sentences_per_s": speeds, "peak_rss_mb": peak_rss_mb(), "embeddings": kept.tolist(), "versions": versions,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
