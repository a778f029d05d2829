"""A module's recurrent layers (``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``) and the step module that
carries their state: the module's own forward, run with each layer's hidden state taken from the
step's inputs and its new state returned beside the logits, so a user's code runs unchanged.

While the step module runs, each recurrent layer's ``forward`` is replaced (on that instance only,
and put back afterwards) by one that ignores the ``hx`` the user's code passes (zeros, or nothing)
and uses the carried state instead. The states travel batch first, [batch, layers, hidden], so a
row of the state store is one sequence's state; the layers take them as [layers, batch, hidden].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ExportError
from ...runtime.state_spec import StateSpec


@dataclass(frozen=True)
class RecurrentLayer:
    name: str  # the layer's attribute path in the module ("rnn", "encoder.lstm")
    layer: nn.RNNBase

    @property
    def kind(self) -> str:
        return type(self.layer).__name__.lower() if type(self.layer) in (nn.LSTM, nn.GRU, nn.RNN) else "rnn"

    @property
    def parts(self) -> tuple[str, ...]:
        """The state tensors: LSTM h and c, the others h."""
        return ("h", "c") if isinstance(self.layer, nn.LSTM) else ("h",)

    def shapes(self) -> list[tuple[int, int]]:
        """Each part's shape per row: (layers, size); an LSTM with projections keeps h projected."""
        r = self.layer
        h = getattr(r, "proj_size", 0) or r.hidden_size
        return [(r.num_layers, h), (r.num_layers, r.hidden_size)][: len(self.parts)]

    def specs(self) -> list[StateSpec]:
        return [
            StateSpec(f"past_state.{self.name}.{part}", f"present_state.{self.name}.{part}", "fixed", shape)
            for part, shape in zip(self.parts, self.shapes())
        ]


def recurrent_layers(module: nn.Module) -> list[RecurrentLayer]:
    """The module's recurrent layers, in the order ``named_modules`` lists them; a bidirectional
    one is refused (it reads the future, so it cannot decode)."""
    found = [RecurrentLayer(name or "rnn", m) for name, m in module.named_modules() if isinstance(m, nn.RNNBase)]
    for r in found:
        if r.layer.bidirectional:
            raise ExportError(f"{r.name} is a bidirectional {type(r.layer).__name__}: it reads later tokens, so it cannot generate; export a unidirectional one")
    return found


class StepModule(nn.Module):
    """``forward(input_ids [batch, seq], logits_to_keep [], *states)`` -> (logits [batch, keep,
    vocab], *new states), ``states`` in the order of ``layers`` and their parts."""

    def __init__(self, module: nn.Module, layers: list[RecurrentLayer]):
        super().__init__()
        self.module = module
        self.layers = layers
        self.eval()  # torch.onnx.export puts a wrapper back in its own mode, recursively

    def forward(self, input_ids, logits_to_keep, *states):
        new_states: list[torch.Tensor] = []
        taken = 0
        try:
            for r in self.layers:
                carried = [s.transpose(0, 1).contiguous() for s in states[taken : taken + len(r.parts)]]
                taken += len(r.parts)
                r.layer.forward = _carrying(r.layer, carried, new_states)
            logits = model_logits(self.module, input_ids)
        finally:
            for r in self.layers:
                r.layer.__dict__.pop("forward", None)
        return (last_positions(logits, input_ids, logits_to_keep), *new_states)


def last_positions(logits: torch.Tensor, input_ids: torch.Tensor, logits_to_keep: torch.Tensor) -> torch.Tensor:
    """The logits [batch, keep, vocab] of the last ``logits_to_keep`` positions."""
    seq = torch.ones_like(input_ids[0]).sum()  # a traced size, not a constant of the example
    keep = torch.arange(logits_to_keep) + (seq - logits_to_keep)
    return logits.index_select(1, keep)


def _carrying(layer: nn.RNNBase, carried: list[torch.Tensor], new_states: list[torch.Tensor]):
    original = type(layer).forward
    calls = []

    def forward(x, hx=None):
        if calls:
            raise ExportError(f"a recurrent layer ({type(layer).__name__}) runs twice in one forward; lmrt carries one state per layer")
        calls.append(1)
        out, h = original(layer, x, carried[0] if len(carried) == 1 else tuple(carried))
        new_states.extend(t.transpose(0, 1) for t in (h if isinstance(h, tuple) else (h,)))
        return out, h

    return forward


def model_logits(module: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The module's logits [batch, seq, vocab] for ``input_ids`` [batch, seq]: its output, or the
    first element of a tuple it returns (``logits, hidden``); [batch * seq, vocab] is reshaped."""
    out = module(input_ids)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    return as_logits(out, input_ids)


def as_logits(out, input_ids: torch.Tensor) -> torch.Tensor:
    """A forward's logits ``out`` as [batch, seq, vocab] for ``input_ids`` [batch, seq]
    ([batch * seq, vocab] reshaped), or ExportError in one line."""
    if not isinstance(out, torch.Tensor):
        raise ExportError(f"the module's forward returned {type(out).__name__}; lmrt needs forward(ids [batch, seq]) -> logits [batch, seq, vocab]")
    batch, seq = input_ids.shape
    if out.dim() == 2 and out.shape[0] == batch * seq:
        out = out.reshape(batch, seq, out.shape[-1])
    if out.dim() != 3 or tuple(out.shape[:2]) != (batch, seq):
        raise ExportError(
            f"the module's forward returned logits of shape {list(out.shape)} for ids [{batch}, {seq}]; "
            "lmrt needs forward(ids [batch, seq]) -> logits [batch, seq, vocab]"
        )
    return out
