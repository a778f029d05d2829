"""The graph's projections found, and the graph rewritten to take LoRA inputs.

A projection is found by the matrix the decoder builder named (``decoder.projections``), in any of
the forms the graph may hold it: a float MatMul, a MatMulNBits of its int8 / int4 blocks (named
``{matrix}.q8`` / ``.q4`` by the quantize rewrite), or the plain-operator fallback that dequantizes
them (``{matrix}.q8.dequantized``). The rewrite adds, after the node that gives the projection's
output y, each position's term x A B of its row's adapter, computed in groups: a step's positions
are gathered per adapter (``lora.index`` [groups, places]: the positions x of each adapter's rows,
padded), each group multiplied by its own adapter's A [in, rank] and B [rank, out] (the inputs
``a`` [groups, in, rank] and ``b`` [groups, rank, out]), padding places zeroed (``lora.valid``), and
each position's term gathered back (``lora.back`` [batch, seq, 2]: its group and place; a row
without an adapter points at a padding place, whose term is 0). So each adapter's matrices are read
once per step for every row that uses it, no row multiplies by another's adapter, and the base
weights stay as they were, float or quantized.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...runtime.adapter_manifest import Lora, LoraInput
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


def add_lora_inputs(model: onnx.ModelProto, sites: dict[str, Site], dtype: str) -> Lora:
    """Rewrite ``model`` in place so each site's y also gets its rows' adapters' terms (the module's
    docstring); returns the manifest section naming the inputs added, without adapters."""
    graph, elem = model.graph, ELEM[dtype]
    lora = Lora()
    graph.input.extend([
        helper.make_tensor_value_info(lora.index, TensorProto.INT64, ["lora_groups", "lora_places"]),
        helper.make_tensor_value_info(lora.valid, elem, ["lora_groups", "lora_places", 1]),
        helper.make_tensor_value_info(lora.back, TensorProto.INT64, ["batch", "seq", 2]),
    ])  # fmt: skip
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    after: dict[int, list[onnx.NodeProto]] = {}
    inputs = []
    for name, site in sites.items():
        t = f"lora.{name}"
        a, b, base, rank = f"{t}.a", f"{t}.b", f"{site.y}.base", f"rank.{name}"
        graph.input.append(helper.make_tensor_value_info(a, elem, ["lora_groups", site.in_features, rank]))
        graph.input.append(helper.make_tensor_value_info(b, elem, ["lora_groups", rank, site.out_features]))
        flat = f"lora.positions_of.{site.in_features}"  # [-1, in]: x with one position per row
        if flat not in {i.name for i in graph.initializer}:
            graph.initializer.append(numpy_helper.from_array(np.array([-1, site.in_features], np.int64), flat))
        at = producer[site.y]
        node = graph.node[at]
        node.output[list(node.output).index(site.y)] = base
        after[at] = [
            helper.make_node("Reshape", [site.x, flat], [f"{t}.x"], name=f"{t}.x"),  # [batch * seq, in]
            helper.make_node("Gather", [f"{t}.x", lora.index], [f"{t}.grouped"], name=f"{t}.grouped", axis=0),  # [groups, places, in]
            helper.make_node("MatMul", [f"{t}.grouped", a], [f"{t}.xa"], name=f"{t}.xa"),  # [groups, places, rank]
            helper.make_node("Mul", [f"{t}.xa", lora.valid], [f"{t}.xa_valid"], name=f"{t}.valid"),  # padding places: 0
            helper.make_node("MatMul", [f"{t}.xa_valid", b], [f"{t}.xab"], name=f"{t}.xab"),  # [groups, places, out]
            helper.make_node("GatherND", [f"{t}.xab", lora.back], [f"{t}.delta"], name=f"{t}.delta"),  # [batch, seq, out]
            helper.make_node("Add", [base, f"{t}.delta"], [site.y], name=f"{t}.add"),
        ]
        inputs.append(LoraInput(name, a, b, site.in_features, site.out_features))
    nodes = []
    for i, node in enumerate(graph.node):
        nodes.append(node)
        nodes.extend(after.get(i, []))
    del graph.node[:]
    graph.node.extend(nodes)
    return dataclasses.replace(lora, inputs=tuple(inputs))
