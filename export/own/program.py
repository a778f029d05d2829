"""A ``torch.export`` program (an ``ExportedProgram``, or a ``.pt2`` file written by
``torch.export.save``) as a module lmrt exports: ``ep.module()``'s graph, run as a stateless
whole-window model.

A ``.pt2`` file is trusted like code: ``torch.export.load`` rebuilds the graph from the archive's
JSON with ``sympy.sympify`` (which evaluates the shape expressions it reads) and unpickles some
payloads in full (tensor subclasses, custom objects, sample inputs that a plain tensor load cannot
read), so only files one made or trusts may be loaded, as with ``model.py:make_model``.

Its sizes must be dynamic: the program is re-run over a growing sequence, on batches of any size.
The sizes the graph reads (``aten.sym_size``) and the operators that take them are called through
their public PyTorch forms, so that the ONNX exporter's tracer records them as sizes rather than
as the numbers of the traced example. A program that holds a recurrent layer (``aten.lstm`` and
the like: its state is made inside the graph, where lmrt cannot carry it) or one exported in
training mode is refused; the module itself exports those.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
import zipfile

import torch
from torch import nn

from ...runtime.errors import first_line
from ..errors import ExportError

RECURRENT_OPS = ("aten::lstm", "aten::gru", "aten::rnn_tanh", "aten::rnn_relu")
EXPORT_HINT = (
    "export it with torch.export.export(module.eval(), (ids,), "
    "dynamic_shapes=({0: Dim('batch'), 1: Dim('seq', max=N)},)) and save it with torch.export.save"
)
PUBLIC_HOMES = (torch._C._VariableFunctions, torch._C._nn, torch._C._special, torch._C._linalg, torch._C._fft)


def load_program(path: str):
    """The ExportedProgram in ``path``, or ExportError in one line (a file that is not a
    torch.export archive is refused before torch reads it)."""
    if not os.path.isfile(path):
        raise ExportError(f"program file not found: {path}")
    names = []
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    if not any(n.rsplit("/", 1)[-1] == "archive_format" for n in names):
        if any(n.endswith("data.pkl") for n in names):
            raise ExportError(
                f"{path} was written by torch.save, not torch.export.save; lmrt never unpickles a module, since unpickling "
                f"runs code from the file: {EXPORT_HINT}, or pass path/to/model.py:make_model --weights FILE"
            )
        raise ExportError(f"{path} is not a torch.export archive (the zip torch.export.save writes); {EXPORT_HINT}")
    try:
        with quiet():
            return torch.export.load(path)
    except Exception as e:  # torch's deserializer raises many kinds
        raise ExportError(f"torch.export.load cannot read {path}: {type(e).__name__}: {first_line(e)}") from None


@contextlib.contextmanager
def quiet():
    """torch's warnings and the log lines its loader writes on a failure, kept off the terminal."""
    loggers = [logging.getLogger(name) for name in ("torch.export", "torch._export")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def is_program(source) -> bool:
    return isinstance(source, torch.export.ExportedProgram)


class ProgramModule(nn.Module):
    """``forward(ids [batch, seq])``: the program's graph (a plain ``GraphModule``), and the range of
    sequence lengths it was exported for (``sequence`` (min, max), max None when unbounded)."""

    def __init__(self, graph: torch.fx.GraphModule, sequence: tuple[int, int | None], name: str):
        super().__init__()
        self.program = graph
        self.sequence = sequence
        self.name = name  # how the export names its source

    def forward(self, ids):
        return self.program(ids)


def program_module(program, name: str = "torch.export program") -> ProgramModule:
    """``program`` as a module lmrt exports, every refusal in one line."""
    if not is_program(program):
        raise ExportError(f"expected a torch.export.ExportedProgram, got {type(program).__name__}")
    inputs = program.graph_signature.user_inputs
    if len(inputs) != 1:
        raise ExportError(
            f"the program takes {len(inputs)} inputs ({', '.join(inputs)}); lmrt takes a program of forward(ids) -> logits. "
            "A module that carries its own state is exported from the module: export_model(module, state=...)"
        )
    for node in program.graph.nodes:
        check_node(node)
    graph = program.module()
    plain = torch.fx.GraphModule(graph, graph.graph)  # ep.module() refuses train()/eval(), which tracing calls
    for node in plain.graph.nodes:
        traceable(node)
    plain.recompile()
    return ProgramModule(plain, sequence_range(program), name)


def check_node(node) -> None:
    """Refuse a recurrent layer (its state lives in the graph) and a graph traced in training mode."""
    op = node.target
    if node.op != "call_function" or not isinstance(op, torch._ops.OpOverload):
        return
    if op._schema.name in RECURRENT_OPS:
        raise ExportError(
            f"the program runs {op._schema.name.split('::')[1]} (a recurrent layer), whose state torch.export builds inside the graph, "
            "where lmrt cannot carry it from step to step; pass the module itself (export_model(module)) or "
            "path/to/model.py:make_model --weights FILE"
        )
    for i, arg in enumerate(op._schema.arguments):
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        if arg.name in ("train", "training") and value is True:
            raise ExportError(f"the program was exported in training mode ({op} with {arg.name}=True); export it from module.eval()")


def sequence_range(program) -> tuple[int, int | None]:
    """(min, max) of the ids' sequence length; static sizes refused, naming the export to run."""
    ids = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == program.graph_signature.user_inputs[0])
    shape = ids.meta["val"].shape
    if len(shape) != 2:
        raise ExportError(f"the program's input has shape {list(shape)}; lmrt passes token ids [batch, seq]: {EXPORT_HINT}")
    fixed = [f"{what} at {size}" for what, size in zip(("batch", "sequence length"), shape) if not isinstance(size, torch.SymInt)]
    if fixed:
        raise ExportError(
            f"the program was exported with a fixed {' and a fixed '.join(fixed)}; lmrt runs it on batches of any size over a "
            f"growing sequence, so both must be dynamic: {EXPORT_HINT}"
        )
    bounds = program.range_constraints.get(shape[1].node.expr)
    if bounds is None:
        return 1, None
    from torch.utils._sympy.numbers import int_oo

    upper = bounds.upper
    return int(bounds.lower), None if upper == int_oo or not upper.is_finite else int(upper)


def program_window(module: ProgramModule, max_length: int | None) -> tuple[int, str]:
    """The window of a program's whole-window graph: ``max_length``, or the most tokens its
    sequence dimension takes; said at export."""
    lowest, longest = module.sequence
    if lowest > 2:  # torch.export starts a dynamic size at 2 (it keeps 0 and 1 for fixed sizes)
        raise ExportError(f"the program's sequence length starts at {lowest} tokens; lmrt runs it from 1: export it with Dim('seq', min=1)")
    if max_length is not None:
        if longest is not None and max_length > longest:
            raise ExportError(f"max_length {max_length} is longer than the program's sequence dimension ({longest} tokens at most)")
        return max_length, "max_length"
    if longest is None:
        raise ExportError("the program's sequence dimension has no upper bound to take the window from; pass max_length= (or export with Dim('seq', max=N))")
    if longest < 2:
        raise ExportError(f"the program's sequence dimension holds {longest} token at most; lmrt needs at least 2")
    return longest, "the program's sequence dimension"


def traceable(node) -> None:
    """Make ``node`` record sizes as sizes when traced: ``aten.sym_size`` becomes ``x.size(d)``, and
    an operator that takes a size is called through its public form (the forms ``torch.ops``
    calls take sizes as plain numbers)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return
    if node.target is torch.ops.aten.sym_size.int:
        node.target = size_of
    elif takes_size(list(node.args) + list(node.kwargs.values())):
        public = public_form(node.target)
        if public is None:
            raise ExportError(f"the program runs {node.target} on a dynamic size, which lmrt cannot trace into ONNX")
        node.target = public


def takes_size(values) -> bool:
    for v in values:
        if isinstance(v, torch.fx.Node) and isinstance(v.meta.get("val"), torch.SymInt):
            return True
        if isinstance(v, (list, tuple)) and takes_size(v):
            return True
    return False


def size_of(x: torch.Tensor, dim: int):
    return x.size(dim)


def slice_of(x: torch.Tensor, dim: int = 0, start=None, end=None, step: int = 1):
    """``aten.slice.Tensor`` as indexing, the form the tracer records with dynamic bounds."""
    return x[(slice(None),) * (dim % x.dim()) + (slice(start, end, step),)]


def public_form(op):
    """The public PyTorch function or Tensor method of an aten operator (same arguments), if any."""
    if op is torch.ops.aten.slice.Tensor:
        return slice_of
    namespace, name = op._schema.name.split("::")
    if namespace != "aten":
        return None
    for home in PUBLIC_HOMES:
        if hasattr(home, name):
            return getattr(home, name)
    return getattr(torch.Tensor, name, None)
