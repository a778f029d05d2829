"""What every export goes through, decoder or encoder: its steps reported as they start, the
validation recorded in the manifest, the provenance, and the directory written in place (or an fp32
reference written and quantized into place)."""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime, timezone
from typing import Any, Callable

from .. import __version__
from ..runtime.manifest import Manifest
from ..runtime.model_dir import scratch_directory, staged_directory
from .errors import ExportError
from .graph import OPSET


class Steps:
    """Prints each step as it starts and how long the previous one took."""

    def __init__(self, report: Callable[[str], None]):
        self.report, self.started, self.name = report, None, None

    def __call__(self, name: str) -> None:
        self.done()
        self.name, self.started = name, time.perf_counter()
        self.report(f"… {name}")

    def done(self) -> None:
        if self.name:
            self.report(f"  {self.name}: {time.perf_counter() - self.started:.1f}s")
        self.name = None


def write_model(
    output: str,
    write: Callable[[str], Manifest],
    summary: Callable[[Manifest, str], str],
    step: Steps,
    scheme: Any = None,
    **quantize_options: Any,
) -> Manifest:
    """``write(directory)`` writes and validates the float model there. Without a quantization
    ``scheme`` that directory becomes ``output``; with one it is the fp32 reference that
    ``quantize_directory`` quantizes into ``output`` (``quantize_options`` go to it). ``summary``
    is the line that says what was exported, and where."""
    if scheme is None:
        with staged_directory(output) as tmp:
            manifest = write(tmp)
            step.done()
        step.report(summary(manifest, output))
        return manifest

    from ..quantize import quantize_directory

    with scratch_directory(output, "fp32") as fp32:
        manifest = write(fp32)
        step.done()
        step.report(summary(manifest, "the fp32 reference"))
        return quantize_directory(fp32, output, scheme, progress=step.report, **quantize_options)


def record_validation(out_dir: str, manifest: Manifest, result: dict, tolerance: float, what: str) -> Manifest:
    """Write the validation ``result`` into the manifest, or fail when the graph's ``what`` (its
    logits, its outputs) differ from PyTorch's by more than ``tolerance``."""
    result["tolerance"] = tolerance
    result["passed"] = result["max_rel_diff"] <= tolerance
    if not result["passed"]:
        raise ExportError(
            f"validation failed: the ONNX {what} differ from PyTorch's by {result['max_rel_diff']:.2e} "
            f"(relative), above the tolerance {tolerance:.0e}; nothing was written"
        )
    manifest = dataclasses.replace(manifest, validation=result)
    manifest.write(out_dir)
    return manifest


def provenance(src: Any, tolerance: float, dtype: str = "float32") -> dict[str, Any]:
    """Where the model came from (``src``: a ``Source`` or an ``EncoderSource``) and what exported it."""
    import onnx
    import torch
    import transformers

    return {
        "source": src.source,
        "source_kind": src.kind,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "lmrt_version": __version__,
        "export_options": {"dtype": dtype, "opset": OPSET, "tolerance": tolerance},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__},
    }
