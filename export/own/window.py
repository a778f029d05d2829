"""A module with no state of its own (a hand-written GPT, ``forward(ids) -> logits`` and no cache):
a whole-window graph, decoded by running every row's tokens again each step. Correct, and slower
than carrying a state: a step costs a pass over the whole sequence so far.

The window is the module's position table (an ``nn.Embedding`` named like ``pos``, ``position`` or
``wpe``: positions past it have no embedding) or ``max_length=``.
"""

from __future__ import annotations

import re

from torch import nn

from ..errors import ExportError
from .recurrent import model_logits

POSITION_NAME = re.compile(r"pos|wpe", re.IGNORECASE)


def position_table(module: nn.Module) -> tuple[str, int] | None:
    """(name, positions) of the module's learned position table, if it has one."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Embedding) and POSITION_NAME.search(name.rsplit(".", 1)[-1]):
            return name, int(m.num_embeddings)
    return None


def window_length(module: nn.Module, max_length: int | None) -> tuple[int, str]:
    """The window in tokens, and where it comes from (said at export)."""
    table = position_table(module)
    if max_length is not None:
        if table is not None and max_length > table[1]:
            raise ExportError(f"max_length {max_length} is longer than the module's position table {table[0]} ({table[1]} positions)")
        return max_length, "max_length"
    if table is None:
        raise ExportError(
            "the module has no recurrent layer and no position table (an nn.Embedding named like pos, position or wpe) "
            "to take its longest sequence from; pass max_length="
        )
    return table[1], f"its position table {table[0]}"


class WindowModule(nn.Module):
    """``forward(input_ids [batch, seq])`` -> logits [batch, seq, vocab]: the module, in its contract's shape."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.eval()  # torch.onnx.export puts a wrapper back in its own mode, recursively

    def forward(self, input_ids):
        return model_logits(self.module, input_ids)
