"""LoRA adapters added to an exported model directory: ``add_adapter`` (``lmrt adapter``).

    from lmrt.export import add_adapter
    add_adapter("models/smollm2", "my-peft-adapter", "support")

``peft_dir`` reads PEFT's files, ``graph`` finds the projections and adds the LoRA inputs,
``fuse`` places PEFT's matrices in lmrt's fused projections, ``pipeline`` writes it all.
"""

from .pipeline import add_adapter

__all__ = ["add_adapter"]
