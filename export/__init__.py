"""lmrt's export stage: a PyTorch / Hugging Face / GGUF model becomes a validated model directory.

    from lmrt.export import export_model
    export_model("path/to/SmolLM2-135M-Instruct.Q4_1.gguf", "models/smollm2")

Needs the ``export`` extra (torch, transformers, onnx, gguf, accelerate); they are imported only when
``export_model`` is first used, so ``ExportError`` is cheap to import.
"""

from .errors import AdapterError, ExportError

__all__ = ["AdapterError", "ExportError", "add_adapter", "export_model"]


def __getattr__(name: str):
    if name == "export_model":
        from .pipeline import export_model

        return export_model
    if name == "add_adapter":
        from .adapters import add_adapter

        return add_adapter
    raise AttributeError(name)
