"""The graph's projections found, and the graph rewritten to take LoRA inputs.

A projection is found by the matrix the decoder builder named (``decoder.projections``), in any of
the forms the graph may hold it: a float MatMul, a MatMulNBits of its int8 / int4 blocks (named
``{matrix}.q8`` / ``.q4`` by the quantize rewrite), or the plain-operator fallback that dequantizes
them (``{matrix}.q8.dequantized``). The rewrite adds, after the node that gives the projection's
output y, the term ((x A) * mask) B: A holds the A matrices of the adapters a step runs side by side
[in, width], B their B matrices one above the other [width, out], and the mask [batch, 1, width]
keeps, for each row, the columns of its own adapter (none for a row without one).
So each adapter's matrices are read once per step for every row that uses it, no matrix is copied
per row, and the base weights stay as they were, float or quantized.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper, numpy_helper

from ...runtime.adapter_manifest import LoraInput
from ...runtime.manifest import Architecture
from ..architectures.decoder import Layout, projections
from ..errors import AdapterError

QUANTIZED_FORM = re.compile(r"(?P<matrix>.+)\.q\d+(?:\.dequantized)?")
ELEM = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


@dataclass(frozen=True)
class Site:
    """Where a projection y = x W is computed: its input x, its output y, and W's sizes."""

    x: str
    y: str
    in_features: int
    out_features: int


def find_sites(model: onnx.ModelProto, layout: Layout, arch: Architecture) -> dict[str, Site]:
    """{"layers.{i}.{name}": Site} for every projection of every layer; AdapterError when the graph
    lacks one (a graph this family's builder did not write)."""
    inits = {t.name: t for t in model.graph.initializer}
    by_matrix: dict[str, Site] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "MatMulNBits") or len(node.input) < 2:
            continue
        weight = node.input[1]
        quantized = QUANTIZED_FORM.fullmatch(weight)
        matrix = quantized["matrix"] if quantized else weight
        y = node.output[0]
        if node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            k, n = attrs["K"], attrs["N"]
            y = y[: -len(".codes")] if y.endswith(".codes") else y  # float zero points: + offsets after
        elif weight in inits and len(inits[weight].dims) == 2:
            k, n = inits[weight].dims
        elif weight.endswith(".dequantized") and weight + ".shape" in inits:
            n, k = numpy_helper.to_array(inits[weight + ".shape"]).tolist()
        else:
            continue
        by_matrix[matrix] = Site(node.input[0], y, int(k), int(n))
    sites = {}
    for i in range(arch.num_layers):
        for name, (matrix, _) in projections(layout, i).items():
            site = by_matrix.get(matrix + ".weight")
            if site is None:
                raise AdapterError(f"the graph has no {matrix} projection: it was not written by lmrt's {arch.family} builder")
            sites[f"layers.{i}.{name}"] = site
    return sites


def add_lora_inputs(model: onnx.ModelProto, sites: dict[str, Site], dtype: str) -> tuple[LoraInput, ...]:
    """Rewrite ``model`` in place so each site's y also gets ((x A) * mask) B; returns the inputs added."""
    graph, elem = model.graph, ELEM[dtype]
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    after: dict[int, list[onnx.NodeProto]] = {}
    inputs = []
    for name, site in sites.items():
        t = f"lora.{name}"
        a, b, mask, base, width = f"{t}.a", f"{t}.b", f"{t}.mask", f"{site.y}.base", f"width.{name}"
        graph.input.append(helper.make_tensor_value_info(a, elem, [site.in_features, width]))
        graph.input.append(helper.make_tensor_value_info(b, elem, [width, site.out_features]))
        graph.input.append(helper.make_tensor_value_info(mask, elem, ["batch", 1, width]))
        at = producer[site.y]
        node = graph.node[at]
        node.output[list(node.output).index(site.y)] = base
        after[at] = [
            helper.make_node("MatMul", [site.x, a], [f"{t}.xa"], name=f"{t}.xa"),  # [batch, seq, width]
            helper.make_node("Mul", [f"{t}.xa", mask], [f"{t}.xa_own"], name=f"{t}.own"),  # each row's own adapter's columns
            helper.make_node("MatMul", [f"{t}.xa_own", b], [f"{t}.delta"], name=f"{t}.delta"),
            helper.make_node("Add", [base, f"{t}.delta"], [site.y], name=f"{t}.add"),
        ]
        inputs.append(LoraInput(name, a, b, mask, site.in_features, site.out_features))
    nodes = []
    for i, node in enumerate(graph.node):
        nodes.append(node)
        nodes.extend(after.get(i, []))
    del graph.node[:]
    graph.node.extend(nodes)
    return tuple(inputs)
