"""lmrt's export stage: a PyTorch / Hugging Face / GGUF model becomes a validated model directory.

    from lmrt.export import export_model
    export_model("path/to/SmolLM2-135M-Instruct.Q4_1.gguf", "models/smollm2")

Needs the ``export`` extra (torch, transformers, onnx, gguf, accelerate).
"""

from .errors import ExportError
from .pipeline import export_model

__all__ = ["ExportError", "export_model"]
