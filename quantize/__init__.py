"""lmrt's quantize stage: an exported fp32 model directory becomes an int8 / int4 one, with onnxruntime's
block-quantized contrib operators (MatMulNBits, GatherBlockQuantized), behind a measured quality gate.

    from lmrt.quantize import quantize_directory, scheme_for
    quantize_directory("models/smollm2", "models/smollm2-int4", scheme_for("int4"))

Needs onnx (and gguf to carry a GGUF file's blocks); both are imported when first used.
"""

from .errors import QualityGateError, QuantizeError
from .schemes import SCHEMES, Scheme, scheme_for

__all__ = ["QualityGateError", "QuantizeError", "SCHEMES", "Scheme", "quantize_directory", "scheme_for"]


def __getattr__(name: str):
    if name == "quantize_directory":
        from .pipeline import quantize_directory

        return quantize_directory
    raise AttributeError(name)
