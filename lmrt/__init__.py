"""lmrt: export language models to ONNX with a KV cache, and run them without PyTorch.

Subpackages: ``lmrt.runtime`` (generation; numpy, onnxruntime and tokenizers only),
``lmrt.export`` (PyTorch / Hugging Face / GGUF → model directory), ``lmrt.quantize``.
"""

__version__ = "0.1.0"
