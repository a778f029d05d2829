"""Where a pass over several new positions stops giving the logits of one-token steps, and a graph
change that removes the difference; writes the "verify-exactness" section of docs/benchmarks.md.

Prompt-lookup speculation checks k proposed tokens in one pass. On a graph quantized with
--compute int8 the logits of that pass differ from those of k one-token steps, so `auto` leaves
speculation off there. This script finds why, in two graphs built from the model directory's own:

- the directory's graph as it is;
- the same graph where every GroupQueryAttention also takes the previous position's packed q/k/v
  (a graph input per layer, [batch, 0 or 1, width]) in front of the new ones, and the new positions'
  q/k/v are a graph output. A one-token step then runs attention over two query rows, rewriting the
  previous position's key and value with the values it already had, and drops the first row.

For each prompt (windows of the quality gate's evaluation text) it reads the first P tokens, then
feeds the next K tokens once as one pass and once as K one-token steps, from the same cache, and
compares the logits position by position. It also times one-token steps of both graphs, interleaved
(plain session.run with fed arrays for both, so the figures compare the graphs, not lmrt's loop).

Why the plain graph differs (onnxruntime's CPU kernels): GroupQueryAttention computes each head's
probabilities x V with MLAS's SGEMM. With one query row (M = 1, alpha 1) SGEMM takes its M = 1 kernel,
which multiplies and adds separately; with several rows it takes the packed kernel, which uses fused
multiply-adds. The two differ in the last bit. On a float graph that stays a last-bit difference; on
an int8-compute graph MatMulNBits quantizes every activation block to int8, a last-bit change flips
a rounding now and then, and the layers grow that into differences the logits show.
MatMulNBits itself gives each row exactly what it gives that row alone. With two query rows in every
pass, every attention runs the packed kernel, whose rows do not depend on each other.

    python benchmarks/verify_exactness.py models/smollm2-135m-instruct-int8 models/smollm2-135m-instruct-int4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import date

from report import machine, write_section


def refed_graph(src: str, dst: str) -> int:
    """Write ``src`` with the previous position's q/k/v fed to each attention node to ``dst``;
    returns the number of attention nodes."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(src)
    graph = model.graph
    past = {i.name: i for i in graph.input}
    graph.initializer.extend([
        helper.make_tensor("refeed.axis", TensorProto.INT64, [1], [1]),
        helper.make_tensor("refeed.end", TensorProto.INT64, [1], [1 << 62]),
    ])  # fmt: skip
    nodes, layer = [], 0
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        head = past[node.input[3]].type.tensor_type.shape.dim[3].dim_value
        width = (attrs["num_heads"] + 2 * attrs["kv_num_heads"]) * head
        i, qkv = layer, node.input[0]
        layer += 1
        graph.input.append(helper.make_tensor_value_info(f"prev_qkv.{i}", TensorProto.FLOAT, ["batch", "prev", width]))
        graph.output.append(helper.make_tensor_value_info(f"qkv.{i}", TensorProto.FLOAT, ["batch", "sequence", width]))
        out = node.output[0]
        node.input[0], node.output[0] = f"refeed.qkv.{i}", f"refeed.attention.{i}"
        nodes += [
            helper.make_node("Identity", [qkv], [f"qkv.{i}"]),
            helper.make_node("Concat", [f"prev_qkv.{i}", qkv], [f"refeed.qkv.{i}"], axis=1),
            helper.make_node("Shape", [f"prev_qkv.{i}"], [f"refeed.prev.{i}"], start=1, end=2),
            node,
            helper.make_node("Slice", [f"refeed.attention.{i}", f"refeed.prev.{i}", "refeed.end", "refeed.axis"], [out]),
        ]  # fmt: skip
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, dst, save_as_external_data=True, location=os.path.basename(dst) + ".data")
    return layer


class Runner:
    """One graph, fed by hand: a KV cache of ``capacity`` positions per layer, and the last position's
    q/k/v where the graph takes it."""

    def __init__(self, path: str, layers: int, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.refed = "prev_qkv.0" in inputs
        self.layers = layers
        self.kv_shape = inputs["past_key_values.0.key"].shape[1:]
        self.widths = [inputs[f"prev_qkv.{i}"].shape[2] for i in range(layers)] if self.refed else []

    def empty(self, capacity: int):
        import numpy as np

        heads, _, head = self.kv_shape
        kv = [np.zeros((1, heads, capacity, head), np.float32) for _ in range(2 * self.layers)]
        return {"kv": kv, "prev": None}

    def run(self, state, ids, length: int):
        """Append ``ids`` (int64 [n]) to a cache holding ``length`` positions; logits [n, vocab]."""
        import numpy as np

        feed = {
            "input_ids": ids[None, :],
            "attention_mask": np.ones((1, length + ids.shape[0]), np.int64),
            "logits_to_keep": np.array(ids.shape[0], np.int64),
        }
        for i in range(self.layers):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = state["kv"][2 * i], state["kv"][2 * i + 1]
            if self.refed:
                prev = state["prev"]
                one_token = ids.shape[0] == 1 and prev is not None
                feed[f"prev_qkv.{i}"] = prev[i] if one_token else np.zeros((1, 0, self.widths[i]), np.float32)
        out = dict(zip(self.names, self.session.run(None, feed)))
        state["kv"] = [out[f"present.{i}.{kind}"] for i in range(self.layers) for kind in ("key", "value")]
        if self.refed:
            state["prev"] = [out[f"qkv.{i}"][:, -1:] for i in range(self.layers)]
        return out["logits"][0]


def copy_state(state):
    return {"kv": [a.copy() for a in state["kv"]], "prev": None if state["prev"] is None else [a.copy() for a in state["prev"]]}


def compare(runner: Runner, ids, prefix: int, k: int, capacity: int):
    """Max |Δlogit| per position between one pass over ids[prefix:prefix+k] and k one-token steps."""
    import numpy as np

    state = runner.empty(capacity)
    runner.run(state, ids[:prefix], 0)
    together = runner.run(copy_state(state), ids[prefix : prefix + k], prefix)
    steps = copy_state(state)
    one_by_one = np.stack([runner.run(steps, ids[prefix + j : prefix + j + 1], prefix + j)[0] for j in range(k)])
    return np.abs(together - one_by_one).max(axis=1)


def step_ms(runner: Runner, ids, prefix: int, capacity: int, steps: int) -> float:
    state = runner.empty(capacity)
    runner.run(state, ids[:prefix], 0)
    start = time.perf_counter()
    for j in range(steps):
        runner.run(state, ids[prefix + j : prefix + j + 1], prefix + j)
    return (time.perf_counter() - start) / steps * 1e3


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dirs", nargs="+", help="lmrt model directories (GroupQueryAttention decoders)")
    p.add_argument("--prefixes", type=int, nargs="+", default=[16, 60, 130, 250, 400], help="positions read before the check")
    p.add_argument("--k", type=int, default=8, help="positions checked in one pass")
    p.add_argument("--steps", type=int, default=64, help="one-token steps per timing run")
    p.add_argument("--rounds", type=int, default=4, help="interleaved timing runs per graph")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--output", help="write the section here instead of docs/benchmarks.md")
    return p.parse_args()


def measure(model_dir: str, args) -> list[str]:
    """The table rows of one model directory: its graph as exported and with the previous position fed again."""
    import numpy as np

    from lmrt.quantize.evaltext import reference_text
    from lmrt.runtime.manifest import load_manifest
    from lmrt.runtime.model import LoadedModel

    manifest = load_manifest(model_dir)
    ids = np.array(LoadedModel(model_dir).encode(reference_text(20_000)), dtype=np.int64)
    need = max(args.prefixes) + max(args.k, args.steps) + 1
    if ids.shape[0] < need:
        sys.exit(f"the evaluation text has {ids.shape[0]} tokens; these settings need {need}")
    capacity = need + 8
    src = os.path.join(model_dir, manifest.graph.file)
    with tempfile.TemporaryDirectory() as tmp:
        dst = os.path.join(tmp, "refed.onnx")
        layers = refed_graph(src, dst)
        graphs = {"as exported": Runner(src, layers, args.threads), "previous position fed again": Runner(dst, layers, args.threads)}
        diffs = {name: [compare(r, ids, p, args.k, capacity) for p in args.prefixes] for name, r in graphs.items()}
        times = {name: [] for name in graphs}
        for _ in range(args.rounds):
            for name, r in graphs.items():
                times[name].append(step_ms(r, ids, args.prefixes[0], capacity, args.steps))
    label = f"{manifest.quantization.get('name', manifest.graph.dtype)}, compute {manifest.quantization.get('compute', manifest.graph.dtype)}"
    rows = []
    for name in graphs:
        cells = [f"{d.max():.2g}" for d in diffs[name]]
        equal = sum(int((d == 0).sum()) for d in diffs[name])
        total = sum(d.shape[0] for d in diffs[name])
        rows.append(f"| {label} | {name} | " + " | ".join(cells) + f" | {equal} of {total} | {statistics.median(times[name]):.2f} |")
    return rows


def main() -> None:
    args = parse_args()
    rows = [row for model_dir in args.model_dirs for row in measure(model_dir, args)]
    lines = [
        "## A pass over several positions against one-token steps",
        "",
        f"SmolLM2-135M-Instruct. For each prefix length P (windows of the quality gate's evaluation text), the next "
        f"{args.k} tokens are fed once as one pass and once as {args.k} one-token steps from the same cache; the table "
        "gives the largest |Δlogit| over the vocabulary and the positions of the pass, and how many of the positions "
        f"were equal bit for bit. Step time: one-token steps fed by hand (session.run, {args.steps} steps after a "
        f"{args.prefixes[0]}-token prompt), median of {args.rounds} interleaved runs. The second graph of each model "
        "feeds each attention node the previous position's q/k/v again, so that every attention has at least two "
        "query rows (the script's docstring says why). Written by `benchmarks/verify_exactness.py`.",
        "",
        f"Machine: {machine()}. Measured {date.today().isoformat()}.",
        "",
        "| model | graph | " + " | ".join(f"P = {p}" for p in args.prefixes) + " | equal positions | ms per one-token step |",
        "|---|---|" + "---:|" * (len(args.prefixes) + 2),
        *rows,
    ]
    markdown = "\n".join(lines)
    write_section("verify-exactness", markdown, *([args.output] if args.output else []))
    print(markdown)


if __name__ == "__main__":
    main()
