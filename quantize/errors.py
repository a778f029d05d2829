class QuantizeError(Exception):
    """A quantization that cannot go on; the message is one line meant for the user."""


class QualityGateError(QuantizeError):
    """The quantized model lost more quality than allowed; nothing was written."""
