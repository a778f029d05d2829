"""A step module traced into an ONNX graph with TorchScript's exporter (``dynamo=False``: it handles
recurrent layers with dynamic batch and sequence sizes, where the dynamo exporter is fragile), and
a failure said in one line that names the operation."""

from __future__ import annotations

import contextlib
import io
import re
import warnings

import torch

from ...runtime.state_spec import StateSpec
from ..errors import ExportError
from ..graph import OPSET

EXAMPLE_PAST = 2  # positions a kv state holds in the traced example (not 0: a size the tracer could fold)
_OPERATOR = re.compile(r"(?:operator|op)\s*'?((?:aten|prim|onnx)::\w+|\w+)'?", re.IGNORECASE)


def trace_graph(step: torch.nn.Module, example_ids: torch.Tensor, specs: list[StateSpec], keep: bool = True):
    """The ONNX ModelProto of ``step(input_ids, logits_to_keep, *states)`` (``keep`` False:
    ``step(input_ids)``), batch and sequence dynamic; ``specs`` name the state inputs and outputs in
    order."""
    import onnx

    batch, seq = example_ids.shape
    states = [torch.zeros(example_shape(s, batch)) for s in specs]
    args = (example_ids, torch.tensor(seq), *states) if keep else (example_ids,)
    inputs = ["input_ids"] + (["logits_to_keep"] if keep else []) + [s.past for s in specs]
    outputs = ["logits"] + [s.present for s in specs]
    axes = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "keep" if keep else "seq"}}
    for s in specs:  # a kv state's positions: those held before the step, and after it
        axes[s.past], axes[s.present] = ({0: "batch", 2: "past"}, {0: "batch", 2: "total"}) if s.kind == "kv" else ({0: "batch"}, {0: "batch"})
    buffer = io.BytesIO()
    try:
        # quiet: TorchScript's tracer warnings, its deprecation notice, the IR it prints on a failure
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                step, args, buffer, dynamo=False, opset_version=OPSET,
                input_names=inputs, output_names=outputs, dynamic_axes=axes, do_constant_folding=True,
            )  # fmt: skip
    except ExportError:
        raise
    except Exception as e:  # the tracer and the exporter raise many kinds
        raise ExportError(f"the module cannot be traced into ONNX: {untraceable(e)}") from None
    return onnx.load_from_string(buffer.getvalue())


def example_shape(spec: StateSpec, batch: int) -> tuple[int, ...]:
    """A state tensor's shape in the traced example: a kv one holds EXAMPLE_PAST positions already."""
    if spec.kind == "kv":
        return (batch, spec.shape[0], EXAMPLE_PAST, *spec.shape[1:])
    return (batch, *spec.shape)


def untraceable(e: Exception) -> str:
    """The operation the exporter could not take, from its message, in one line."""
    text = " ".join(str(e).split())
    found = _OPERATOR.search(text)
    if found and "::" in found.group(1):
        return f"it uses {found.group(1)}, which the ONNX exporter (opset {OPSET}) does not support; {text[:200]}"
    return f"{type(e).__name__}: {text[:300]}"
