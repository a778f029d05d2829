"""``save_graph``: an onnx ModelProto written into a model directory as its graph file, the weights in
the data file beside it (graphs past 2 GB cannot be one protobuf file). Export and quantize both
write their graphs through it; ``save_quantized`` adds the source directory's tokenizer."""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Callable

from ..runtime.model_dir import DATA_FILE, GRAPH_FILE

if TYPE_CHECKING:
    from ..runtime.manifest import Manifest


def save_graph(model, out_dir: str) -> tuple[str, str]:
    """Write ``model`` as ``model.onnx`` with its weights in ``model.onnx.data``; returns the two
    file names."""
    import onnx

    onnx.save_model(
        model,
        os.path.join(out_dir, GRAPH_FILE),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=1024,
    )
    return GRAPH_FILE, DATA_FILE


def save_quantized(model, out_dir: str, source_dir: str, manifest: Manifest, progress: Callable[[str], None]) -> None:
    """Write the quantized ``model`` into ``out_dir`` with the tokenizer of ``source_dir``, the
    directory it was quantized from (``manifest`` is that directory's)."""
    progress("… writing the graph")
    save_graph(model, out_dir)
    shutil.copy(os.path.join(source_dir, manifest.tokenizer.file), out_dir)
