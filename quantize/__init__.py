"""Weight quantization of exported model directories (int8 / int4 / fp16).

Nothing is implemented here yet: ``lmrt export`` writes fp32 graphs only.
"""
