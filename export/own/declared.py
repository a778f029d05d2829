"""A module that carries its own state: ``forward(ids, state) -> (logits, new_state)``, the state
None at the start and afterwards what the module returned (a tensor, or tuples, lists and dicts of
tensors, each tensor batch first), such as a hand-written GPT with its own KV cache or a custom
recurrence.

Each state tensor is declared (``state={name: (kind, per-row shape)}``, in the order the module's
state lists its tensors, or by their keys when it is a dict) or, with ``state="infer"`` or a
forward whose second parameter is named ``state``, inferred from one traced step: a tensor that
keeps its shape is "fixed"; one that grows by the step's tokens along axis 2 is "kv" ([batch, heads,
positions, head size], every KV cache's layout). A declaration that differs from that step is
refused in one line, before anything is traced.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ...runtime.errors import first_line
from ...runtime.state_spec import KINDS, StateSpec
from ..errors import ExportError
from .module import probe
from .recurrent import as_logits, last_positions

CONTRACT = "a module with a state has forward(ids, state) -> (logits, new_state), its state None at the start"
KV_AXIS = 2  # the axis a kv state grows along: [batch, heads, positions, head size]


def carries_state(module: nn.Module, state: Any) -> bool:
    """Whether the module is exported with its own state: ``state=`` given, or a forward whose
    parameters after ids include one named ``state``."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if state is None:
        return "state" in list(params)[1:]
    try:
        inspect.signature(module.forward).bind(None, None)
    except TypeError:
        raise ExportError(f"state= is given, but the module's forward takes no state; {CONTRACT}") from None
    return True


def call(module: nn.Module, ids: torch.Tensor, state) -> tuple[torch.Tensor, Any]:
    """(logits [batch, seq, vocab], new state) of ``module(ids, state)``."""
    out = module(ids, state)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ExportError(f"the module's forward(ids, state) returned {type(out).__name__}; {CONTRACT}")
    return as_logits(out[0], ids), out[1]


def flatten(tree, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor in a state, names the path of keys and indices ("0.k")."""
    if isinstance(tree, torch.Tensor):
        return [(prefix or "state", tree)]
    if isinstance(tree, dict) and all(isinstance(k, str) for k in tree):
        items = list(tree.items())
    elif isinstance(tree, (tuple, list)):
        items = list(enumerate(tree))
    else:
        raise ExportError(f"the module's state holds a {type(tree).__name__} at {prefix or 'its top'}; lmrt carries tensors in tuples, lists and dicts")
    return [pair for key, value in items for pair in flatten(value, f"{prefix}.{key}" if prefix else str(key))]


def rebuild(template, tensors):
    """``template``'s structure with its tensors taken from the iterator ``tensors``, in order."""
    if isinstance(template, torch.Tensor):
        return next(tensors)
    if isinstance(template, dict):
        return {k: rebuild(v, tensors) for k, v in template.items()}
    return type(template)(rebuild(v, tensors) for v in template)


def traced_state(module: nn.Module, vocab: int) -> tuple[Any, list[tuple[str, str, tuple[int, ...]]]]:
    """The state's structure and (name, kind, per-row shape) of each tensor, from a step of 3
    tokens from None and one of 2 more (batch 2)."""
    try:
        _, first = call(module, probe(vocab, 2, 3), None)
        _, second = call(module, probe(vocab, 2, 2, seed=4), first)
    except ExportError:
        raise
    except Exception as e:  # the user's code
        raise ExportError(f"the module's forward(ids, state) failed ({type(e).__name__}: {first_line(e)}); {CONTRACT}") from None
    before, after = flatten(first), flatten(second)
    if [n for n, _ in before] != [n for n, _ in after]:
        raise ExportError("the module's state changes its structure from one step to the next; lmrt carries the same tensors every step")
    found = []
    for (name, a), (_, b) in zip(before, after):
        if a.dtype != torch.float32:
            raise ExportError(f"state {name} is {str(a.dtype).removeprefix('torch.')}; lmrt carries float32 state")
        if a.dim() < 2 or a.shape[0] != 2:
            raise ExportError(f"state {name} has shape {list(a.shape)} for ids of batch 2; each state tensor is [batch, ...], batch first")
        if a.shape == b.shape:
            found.append((name, "fixed", tuple(a.shape[1:])))
        elif a.dim() > KV_AXIS + 1 and b.shape[KV_AXIS] == a.shape[KV_AXIS] + 2 and drop_axis(a.shape) == drop_axis(b.shape):
            found.append((name, "kv", drop_axis(a.shape)[1:]))
        else:
            raise ExportError(
                f"state {name} goes from {list(a.shape)} to {list(b.shape)} in a step of 2 tokens; lmrt carries a state that "
                "keeps its shape (fixed) or grows by the step's tokens along axis 2 (kv: [batch, heads, positions, head size])"
            )
    return first, found


def drop_axis(shape) -> tuple[int, ...]:
    return tuple(n for i, n in enumerate(shape) if i != KV_AXIS)


def declared_specs(declaration: Any, found: list[tuple[str, str, tuple[int, ...]]]) -> tuple[StateSpec, ...]:
    """The StateSpecs of the module's state: ``found`` (the traced step's), named by
    ``declaration`` when there is one and checked against it."""
    names = [name for name, _, _ in found]
    if declaration in (None, "infer"):
        return tuple(spec(name, kind, shape) for name, kind, shape in found)
    if not isinstance(declaration, dict):
        raise ExportError(f"state= must be a dict of name: (kind, per-row shape) or \"infer\", got {type(declaration).__name__}")
    declared = [(name, *read_entry(name, value)) for name, value in declaration.items()]
    if len(declared) != len(found):
        raise ExportError(f"state= declares {len(declared)} tensors, but the module's state holds {len(found)} ({', '.join(names)})")
    if {n for n, _, _ in declared} == set(names):  # a dict state: matched by its keys
        declared = sorted(declared, key=lambda d: names.index(d[0]))
    for (name, kind, shape), (_, traced_kind, traced_shape) in zip(declared, found):
        if (kind, shape) != (traced_kind, traced_shape):
            raise ExportError(
                f"state= declares {name} as {kind} {list(shape)} per row, but a traced step gives {traced_kind} {list(traced_shape)}"
                + (" (kv: the shape without its positions axis)" if "kv" in (kind, traced_kind) else "")
            )
    return tuple(spec(name, kind, shape) for name, kind, shape in declared)


def read_entry(name: Any, value: Any) -> tuple[str, tuple[int, ...]]:
    """(kind, shape) of one declared tensor, or ExportError in one line."""
    ok = isinstance(name, str) and name and isinstance(value, (tuple, list)) and len(value) == 2
    kind, shape = value if ok else (None, None)
    ok = ok and kind in KINDS and isinstance(shape, (tuple, list)) and shape
    if not ok or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape):
        raise ExportError(f"state= declares {name!r} as {value!r}; each entry is name: (kind, per-row shape), kind \"kv\" or \"fixed\"")
    return kind, tuple(shape)


def spec(name: str, kind: str, shape: tuple[int, ...]) -> StateSpec:
    return StateSpec(f"past_state.{name}", f"present_state.{name}", kind, tuple(int(n) for n in shape))


class FromNothing(nn.Module):
    """``forward(ids)`` -> logits: the module run over ``ids`` from its start (state None), what the
    export's checks and validation compare the graph with."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, input_ids):
        return call(self.module, input_ids, None)[0]


class DeclaredStep(nn.Module):
    """``forward(input_ids, logits_to_keep, *states)`` -> (logits [batch, keep, vocab], *new states):
    the module's forward with its state rebuilt from the flat tensors, in ``template``'s structure."""

    def __init__(self, module: nn.Module, template):
        super().__init__()
        self.module = module
        self.template = template
        self.eval()  # torch.onnx.export puts a wrapper back in its own mode, recursively

    def forward(self, input_ids, logits_to_keep, *states):
        logits, new = call(self.module, input_ids, rebuild(self.template, iter(states)))
        return (last_positions(logits, input_ids, logits_to_keep), *(t for _, t in flatten(new)))
