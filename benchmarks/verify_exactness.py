"""Whether a pass over several new positions gives the logits of one-token steps, on graphs with and
without the scratch query row; writes the "verify-exactness" section of docs/benchmarks.md.

Prompt-lookup speculation checks k proposed tokens in one pass. The exporter gives every attention
node of a pass over one row a scratch query row after the new ones (export/scratch_row.py says why), so
that the pass gives bit for bit the logits of k one-token steps, and "auto" speculates on
--compute int8 models too. This script measures that on the directories it is given:

- a directory exported with the scratch row is measured as it is;
- one exported without it (an older lmrt, or --target ort-1.19) is measured as it is and with the
  scratch row added to its graph here, side by side (a Slice and a Concat per input, for one row;
  the exporter gathers the same rows with one Gather).

For each prompt (windows of the quality gate's evaluation text) it reads the first P tokens, then
feeds the next K tokens once as one pass and once as K one-token steps, from the same cache, and
compares the logits position by position. It also times one-token steps of the graphs, interleaved
(plain session.run with fed arrays, so the figures compare the graphs, not lmrt's loop).

Why a graph without the scratch row differs (onnxruntime's CPU kernels): GroupQueryAttention
computes each head's probabilities x V with MLAS's SGEMM. With one query row (M = 1, alpha 1) SGEMM
takes its M = 1 kernel, which multiplies and adds separately; with several rows it takes the packed
kernel, which uses fused multiply-adds. The two differ in the last bit. On a float graph that stays
a last-bit difference; on an int8-compute graph MatMulNBits quantizes every activation block to
int8, a last-bit change flips a rounding now and then, and the layers grow that into differences
the logits show. MatMulNBits itself gives each row exactly what it gives that row alone.

    python benchmarks/verify_exactness.py models/smollm2-135m-instruct-int8 models/smollm2-135m-instruct-int8-noscratch
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


def scratch_row_graph(src: str, dst: str) -> int:
    """Write ``src`` (a graph exported without the scratch row) with one query row appended after the
    new ones at every attention node to ``dst``: a copy of the last new row, its output dropped, as
    the exporter's graph has it for a batch of one row; returns the number of attention nodes."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(src)
    graph = model.graph
    graph.initializer.extend([
        helper.make_tensor("scratch.axis", TensorProto.INT64, [1], [1]),
        helper.make_tensor("scratch.start", TensorProto.INT64, [1], [0]),
        helper.make_tensor("scratch.last", TensorProto.INT64, [1], [-1]),
        helper.make_tensor("scratch.end", TensorProto.INT64, [1], [1 << 62]),
        helper.make_tensor("scratch.one", TensorProto.INT32, [], [1]),
    ])  # fmt: skip
    nodes, layer, counts = [], 0, {}
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            nodes.append(node)
            continue
        i = layer
        layer += 1
        for slot in (0, 1, 2):
            x = node.input[slot]
            if not x:
                continue
            nodes += [
                helper.make_node("Slice", [x, "scratch.last", "scratch.end", "scratch.axis"], [f"scratch.{i}.{slot}.last"]),
                helper.make_node("Concat", [x, f"scratch.{i}.{slot}.last"], [f"scratch.{i}.{slot}"], axis=1),
            ]
            node.input[slot] = f"scratch.{i}.{slot}"
        for slot in (5, 6):
            x = node.input[slot]
            if x not in counts:
                counts[x] = f"scratch.count.{len(counts)}"
                nodes.append(helper.make_node("Add", [x, "scratch.one"], [counts[x]]))
            node.input[slot] = counts[x]
        out = node.output[0]
        node.output[0] = f"scratch.attention.{i}"
        nodes += [node, helper.make_node("Slice", [f"scratch.attention.{i}", "scratch.start", "scratch.last", "scratch.axis"], [out])]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, dst, save_as_external_data=True, location=os.path.basename(dst) + ".data")
    return layer


class Runner:
    """One graph, fed by hand: a KV cache of ``capacity`` positions per layer (one more for the
    scratch row's key and value)."""

    def __init__(self, path: str, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.layers = sum(1 for name in inputs if name.endswith(".key") and name.startswith("past_key_values."))
        self.kv_shape = inputs["past_key_values.0.key"].shape[1:]

    def empty(self, capacity: int):
        import numpy as np

        heads, _, head = self.kv_shape
        return [np.zeros((1, heads, capacity + 1, head), np.float32) for _ in range(2 * self.layers)]

    def run(self, kv, ids, length: int):
        """Append ``ids`` (int64 [n]) to a cache holding ``length`` positions; logits [n, vocab]."""
        import numpy as np

        feed = {
            "input_ids": ids[None, :],
            "attention_mask": np.ones((1, length + ids.shape[0]), np.int64),
            "logits_to_keep": np.array(ids.shape[0], np.int64),
        }
        for i in range(self.layers):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = kv[2 * i], kv[2 * i + 1]
        out = dict(zip(self.names, self.session.run(None, feed)))
        kv[:] = [out[f"present.{i}.{kind}"] for i in range(self.layers) for kind in ("key", "value")]
        return out["logits"][0]


def compare(runner: Runner, ids, prefix: int, k: int, capacity: int):
    """Max |Δlogit| per position between one pass over ids[prefix:prefix+k] and k one-token steps."""
    import numpy as np

    kv = runner.empty(capacity)
    runner.run(kv, ids[:prefix], 0)
    together = runner.run([a.copy() for a in kv], ids[prefix : prefix + k], prefix)
    one_by_one = np.stack([runner.run(kv, ids[prefix + j : prefix + j + 1], prefix + j)[0] for j in range(k)])
    return np.abs(together - one_by_one).max(axis=1)


def step_ms(runner: Runner, ids, prefix: int, capacity: int, steps: int) -> float:
    kv = runner.empty(capacity)
    runner.run(kv, ids[:prefix], 0)
    start = time.perf_counter()
    for j in range(steps):
        runner.run(kv, ids[prefix + j : prefix + j + 1], prefix + j)
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


def measure(model_dir: str, args, tmp: str) -> list[tuple]:
    """(model label, graph label, runner, Δlogits per prefix, token ids) of one model directory: its graph as
    exported, and with the scratch row added where it has none."""
    import numpy as np

    from lmrt.quantize.evaltext import reference_text
    from lmrt.runtime.manifest import load_manifest
    from lmrt.runtime.model import LoadedModel

    manifest = load_manifest(model_dir)
    ids = np.array(LoadedModel(model_dir).encode(reference_text(20_000)), dtype=np.int64)
    need = max(args.prefixes) + max(args.k, args.steps) + 1
    if ids.shape[0] < need:
        sys.exit(f"the evaluation text has {ids.shape[0]} tokens; these settings need {need}")
    src = os.path.join(model_dir, manifest.graph.file)
    exported = "with the scratch row" if manifest.graph.io.scratch_positions else "without the scratch row"
    graphs = {f"as exported ({exported})": Runner(src, args.threads)}
    if not manifest.graph.io.scratch_positions:
        dst = os.path.join(tmp, f"scratch-{len(os.listdir(tmp))}.onnx")
        scratch_row_graph(src, dst)
        graphs["scratch row added"] = Runner(dst, args.threads)
    label = f"{manifest.quantization.get('name', manifest.graph.dtype)}, compute {manifest.quantization.get('compute', manifest.graph.dtype)}"
    return [(label, name, r, [compare(r, ids, p, args.k, need + 8) for p in args.prefixes], ids) for name, r in graphs.items()]


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        graphs = [g for model_dir in args.model_dirs for g in measure(model_dir, args, tmp)]
        times = [[] for _ in graphs]
        need = max(args.prefixes) + max(args.k, args.steps) + 1
        for _ in range(args.rounds):  # every graph of every directory, interleaved
            for spent, (_, _, runner, _, ids) in zip(times, graphs):
                spent.append(step_ms(runner, ids, args.prefixes[0], need + 8, args.steps))
    rows = []
    for (label, name, _, diffs, _), spent in zip(graphs, times):
        cells = [f"{d.max():.2g}" for d in diffs]
        equal = sum(int((d == 0).sum()) for d in diffs)
        total = sum(d.shape[0] for d in diffs)
        rows.append(f"| {label} | {name} | " + " | ".join(cells) + f" | {equal} of {total} | {statistics.median(spent):.2f} |")
    lines = [
        "## A pass over several positions against one-token steps",
        "",
        f"SmolLM2-135M-Instruct. For each prefix length P (windows of the quality gate's evaluation text), the next "
        f"{args.k} tokens are fed once as one pass and once as {args.k} one-token steps from the same cache; the table "
        "gives the largest |Δlogit| over the vocabulary and the positions of the pass, and how many of the positions "
        f"were equal bit for bit. Step time: one-token steps fed by hand (session.run, {args.steps} steps after a "
        f"{args.prefixes[0]}-token prompt), median of {args.rounds} runs, every graph of the table interleaved. A graph "
        "without the scratch query row (exported by an older lmrt) is also measured with the row added as the exporter "
        "now writes it (the script's docstring says why it matters). Written by `benchmarks/verify_exactness.py`.",
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
