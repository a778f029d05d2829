"""What ``lmrt embed``, ``lmrt classify`` and ``lmrt info`` print for encoders."""

from __future__ import annotations

import json
from typing import IO, Sequence

import numpy as np

from .precision import weights_row
from .runtime.encoder import Label
from .runtime.manifest import Manifest


def read_texts(texts: Sequence[str], stdin: IO[str]) -> list[str]:
    """The command line's texts, with each "-" replaced by the lines of standard input."""
    out: list[str] = []
    for text in texts:
        out.extend(stdin.read().splitlines() if text == "-" else [text])
    if not out:
        raise ValueError("no texts: standard input was empty")
    return out


def _number(x: float) -> str:
    return f"{x:.9g}"  # enough digits to give back the same float32


def embedding_line(index: int, vector: np.ndarray, as_json: bool) -> str:
    if as_json:
        return json.dumps({"index": index, "embedding": [float(_number(x)) for x in vector.tolist()]})
    return " ".join(_number(x) for x in vector.tolist())


def labels_line(index: int, labels: list[Label], as_json: bool) -> str:
    if as_json:
        found = [{"label": lab.label, "score": lab.score} for lab in labels]
        return json.dumps({"index": index, "labels": found}, ensure_ascii=False)
    return "\t".join(f"{lab.label}\t{lab.score:.4f}" for lab in labels)


def encoder_rows(m: Manifest, size: int) -> list[tuple[str, str]]:
    """``lmrt info``'s rows for an encoder directory."""
    a, e, p, v = m.architecture, m.encoder, m.provenance, m.validation
    if m.task == "embed":
        normalized = ", L2-normalized" if e.normalize else ""
        task = f"embed: {e.dimension}-dimensional embeddings, {e.pooling} pooling{normalized}"
    else:
        shown = ", ".join(e.labels[:8]) + (", ..." if len(e.labels) > 8 else "")
        task = f"classify: {len(e.labels)} labels ({shown}), {e.problem_type}, scores by {e.score_function}"
    rows = [
        ("model", f"{a.model_type} ({a.family} family) encoder, {a.num_layers} layers, hidden {a.hidden_size}"),
        ("attention", f"{a.num_heads} heads, head size {a.head_size}"),
        ("vocabulary", str(a.vocab_size)),
        ("task", task),
        ("max length", f"{e.max_length} tokens per text (longer ones are cut, or refused with --no-truncate)"),
        ("weights", weights_row(m, size)),
        ("source", f"{p.get('source', '?')} ({p.get('source_kind', '?')}), lmrt {p.get('lmrt_version', '?')}"),
    ]
    if v:
        agreement = (
            f"label agreement {v['label_agreement']:.1%}" if "label_agreement" in v else f"min cosine {v['min_cosine']:.6f}"
        )
        rows.append(
            ("validation", f"max |Δ| {v['max_abs_diff']:.2e} (relative {v['max_rel_diff']:.2e}), {agreement}, "
                           f"{'passed' if v.get('passed') else 'FAILED'}")
        )  # fmt: skip
    q, g = m.quantization, m.quality
    if q:
        rows.append(("quantization", f"{q['name']}: weights {q['method']}; activations {q['activations']}"))
    if g and "label_agreement" in g:
        quality = (
            f"label agreement with fp32 {g['label_agreement']:.1%} over {g['texts']} texts, "
            f"largest score difference {g['max_score_diff']:.3f}"
        )
    elif g:
        quality = f"cosine to fp32 mean {g['mean_cosine']:.4f}, min {g['min_cosine']:.4f} over {g['texts']} texts"
    if g:
        rows.append(("quality", quality + (" (kept with --allow-degraded)" if g.get("allowed_degraded") else "")))
    return rows
