"""``export_module``: a user's own PyTorch language model (an ``nn.Module`` whose ``forward(ids)``
returns logits) → a validated model directory, in one of two kinds found from the module:

- recurrent (``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` inside): a step graph whose states are graph
  inputs and outputs (``recurrent.py``), each sequence's state a "fixed" row of the runtime's store;
- declared state (``forward(ids, state) -> (logits, new_state)``, ``state=`` or inferred): a step
  graph over the module's own state tensors (``declared.py``), "kv" ones growing by each step;
- stateless (any other causal module): a whole-window graph re-run over the row's tokens at each
  step (``window.py``), as said once at export and in ``lmrt info``.

Every refusal (tokenizer, vocabulary, causality, window, tracing) comes before the graph is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from ... import __version__
from ...quantize.graph_file import save_graph
from ...runtime.manifest import Architecture, Graph, GraphIO, Manifest, StateSpec, TokenizerInfo
from ...runtime.model_dir import DATA_FILE, GRAPH_FILE, TOKENIZER_FILE, remove_leftovers
from ..errors import ExportError
from ..graph import OPSET
from ..stages import Steps, provenance, record_validation, write_model
from .declared import DeclaredStep, FromNothing, carries_state, declared_specs, traced_state
from .module import check_causal, evaluated, logits_vocabulary, probe
from .program import ProgramModule, program_window
from .recurrent import StepModule, recurrent_layers
from .trace import trace_graph
from .validate import validate_module
from .vocabulary import load_tokenizer, special_ids
from .window import WindowModule, position_table, window_length

RECURRENT_CONTEXT = 4096  # a recurrent state does not grow: the longest sequence, by default
_NO_CACHE = dict(attention_mask="", position_ids="", past_key="", past_value="", present_key="", present_value="")
RECURRENT_IO = GraphIO(**_NO_CACHE)  # no attention mask, no positions: a recurrent step needs neither
WINDOW_IO = GraphIO(**_NO_CACHE, logits_to_keep="")  # token ids in, logits of every position out


@dataclass(frozen=True)
class Kind:
    """How a module is exported: its graph's wrapper, state and names, and what is said about it."""

    wrapper: Any  # the nn.Module traced
    arch: Architecture
    io: GraphIO
    state: tuple[StateSpec, ...]
    decoding: str  # "step", "declared" or "window" (the manifest's graph.decoding)
    tracing: str  # the step line of the export
    note: str = ""  # said once, before it: what the kind costs


def export_module(
    module, output: str, tokenizer: Any, tolerance: float, progress, scheme=None, force: bool = False,
    target=None, max_length: int | None = None, state: Any = None, **quantize_options: Any,
) -> Manifest:  # fmt: skip
    """Export ``module`` into ``output`` (checked by ``export_model``); see the module docstring."""
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        raise ExportError(f"max_length must be a whole number of tokens, at least 2; got {max_length!r}")
    tok = load_tokenizer(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    step = Steps(progress)
    with evaluated(module):
        stateful = carries_state(module, state)
        whole = FromNothing(module) if stateful else module  # forward(ids) -> logits, either way
        vocab = logits_vocabulary(whole, tok.get_vocab_size(with_added_tokens=True))
        kind = declared_kind(module, vocab, max_length, state) if stateful else module_kind(module, vocab, max_length)
        check_causal(whole, vocab, tolerance)
        remove_leftovers(output, progress)
        origin = module.name if isinstance(module, ProgramModule) else f"{type(module).__module__}.{type(module).__qualname__}"
        source = SimpleNamespace(source=origin, kind="torch.export program" if isinstance(module, ProgramModule) else "pytorch module")
        info = TokenizerInfo(file=TOKENIZER_FILE, chat_template=template if isinstance(template, str) else None, **special_ids(tok))

        def write(out_dir: str) -> Manifest:
            if kind.note:
                step.report(kind.note)
            step(kind.tracing)
            graph = trace_graph(kind.wrapper, probe(vocab, 2, 3), list(kind.state), keep=kind.decoding != "window")
            graph.producer_name, graph.producer_version = "lmrt", __version__
            step("writing the graph")
            save_graph(graph, out_dir)
            data = DATA_FILE if os.path.exists(os.path.join(out_dir, DATA_FILE)) else None  # tiny graphs keep their weights inside
            tok.save(os.path.join(out_dir, TOKENIZER_FILE))
            manifest = Manifest(
                architecture=kind.arch,
                graph=Graph(GRAPH_FILE, data, OPSET, "float32", kind.io, kind.state, kind.decoding),
                tokenizer=info,
                provenance=provenance(source, tolerance),
            )
            manifest.write(out_dir)
            step("validating against the module (one pass and step by step)")
            result = validate_module(out_dir, manifest, whole)
            if not result["greedy_tokens_identical"]:
                raise ExportError("validation failed: greedy decoding with the graph chose other tokens than the module; nothing was written")
            return record_validation(out_dir, manifest, result, tolerance, "logits")

        return write_model(output, write, _summary, step, scheme, gguf=None, force=force, target=target, **quantize_options)


def module_kind(module, vocab: int, max_length: int | None) -> Kind:
    """Recurrent when the module has recurrent layers, else stateless with a window."""
    layers = recurrent_layers(module)
    if layers:
        kinds = "+".join(dict.fromkeys(r.kind for r in layers))
        arch = Architecture(
            family="recurrent", model_type=kinds, num_layers=sum(r.layer.num_layers for r in layers),
            num_heads=0, num_kv_heads=0, head_size=0, hidden_size=max(r.layer.hidden_size for r in layers),
            vocab_size=vocab, context_length=max_length or RECURRENT_CONTEXT,
        )  # fmt: skip
        tracing = f"tracing the step graph ({arch.num_layers} {kinds} layers, their state carried by lmrt)"
        return Kind(StepModule(module, layers), arch, RECURRENT_IO, tuple(s for r in layers for s in r.specs()), "step", tracing)
    program = isinstance(module, ProgramModule)
    window, origin = program_window(module, max_length) if program else window_length(module, max_length)
    arch = Architecture(
        family="window", model_type="program" if program else type(module).__name__.lower(), num_layers=0, num_heads=0, num_kv_heads=0,
        head_size=0, hidden_size=embedding_width(module), vocab_size=vocab, context_length=window,
    )  # fmt: skip
    note = (
        f"note: the module carries no state, so it is exported as a whole-window graph of {window} tokens ({origin}) "
        "and each step runs the sequence so far again (correct, slower than a cache)"
    )
    return Kind(WindowModule(module), arch, WINDOW_IO, (), "window", f"tracing the whole-window graph ({window} tokens)", note)


def declared_kind(module, vocab: int, max_length: int | None, declaration: Any) -> Kind:
    """A module with its own state: a step graph over its state tensors, the declaration checked
    against one traced step. A kv state grows with the sequence, so it needs a bound: the module's
    position table or ``max_length=``."""
    template, found = traced_state(module, vocab)
    specs = declared_specs(declaration, found)
    grows = any(s.kind == "kv" for s in specs)
    context = window_length(module, max_length)[0] if grows or position_table(module) else max_length or RECURRENT_CONTEXT
    arch = Architecture(
        family="declared", model_type=type(module).__name__.lower(), num_layers=0, num_heads=0, num_kv_heads=0,
        head_size=0, hidden_size=embedding_width(module), vocab_size=vocab, context_length=context,
    )  # fmt: skip
    counts = ", ".join(f"{sum(s.kind == k for s in specs)} {k}" for k in ("kv", "fixed") if any(s.kind == k for s in specs))
    tracing = f"tracing the step graph (the module's own state: {counts} tensors, carried by lmrt)"
    return Kind(DeclaredStep(module, template), arch, RECURRENT_IO, specs, "declared" if grows else "step", tracing)


def embedding_width(module) -> int:
    """The width of the module's first embedding table (its hidden size, as far as lmrt can tell)."""
    from torch import nn

    return next((m.embedding_dim for m in module.modules() if isinstance(m, nn.Embedding)), 1)


def _summary(manifest: Manifest, where: str) -> str:
    v = manifest.validation
    how = "re-run over its window each step" if manifest.graph.decoding == "window" else "state carried step by step"
    return (
        f"exported {manifest.architecture.model_type} module ({how}) to {where}: "
        f"max |Δlogit| {v['max_abs_diff']:.2e} (relative {v['max_rel_diff']:.2e}), greedy tokens identical"
    )
