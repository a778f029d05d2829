"""The model directory's size, for the commands that report it; the model directory's files and its
atomic writes are ``lmrt.runtime.model_dir``."""

from .runtime.model_dir import directory_size

__all__ = ["directory_size"]
