"""Which task a source is exported for, read from its files before anything heavy is imported.

  a sentence-transformers model (modules.json)          -> "embed"
  a *ForSequenceClassification config                   -> "classify"
  another BERT-family encoder (BertModel, BertForMaskedLM, ...) -> "embed", mean pooling,
                                                           as sentence-transformers treats it
  anything else (decoders, GGUF files)                  -> "generate"
"""

from __future__ import annotations

from ...runtime.manifest import TASKS
from ..errors import ExportError
from ..source_files import read_json
from .families import FAMILIES

MODULES_FILE = "modules.json"  # sentence-transformers' list of the model's modules


def detect_task(source: str, requested: str | None = None) -> str:
    """The task to export ``source`` for: ``requested`` when given (checked against what the source
    can do), otherwise detected from its files."""
    if requested is not None and requested not in TASKS:
        raise ExportError(f"unknown task {requested!r}; choose one of {', '.join(TASKS)}")
    config = read_json(source, "config.json")
    model_type = config.get("model_type") if isinstance(config, dict) else None
    encoder = model_type in FAMILIES
    if requested in ("embed", "classify") and config is None:
        raise ExportError(f"--task {requested} needs a BERT-family encoder with a config.json; found none for {source}")
    if requested in ("embed", "classify") and not encoder:
        raise ExportError(
            f"--task {requested} needs a BERT-family encoder ({', '.join(sorted(FAMILIES))}); "
            f"{source} is a {model_type!r} model"
        )
    if requested == "generate" and encoder:
        raise ExportError(f"{source} is an encoder ({model_type}); export it with --task embed or --task classify")
    if requested is not None:
        return requested
    if not encoder:
        return "generate"
    if read_json(source, MODULES_FILE) is not None:
        return "embed"
    if any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        return "classify"
    return "embed"
