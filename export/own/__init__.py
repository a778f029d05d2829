"""A user's own PyTorch language model (an ``nn.Module``) exported: ``export_module``. Imported
lazily (``factory.is_module_source`` is asked about every source, before torch is imported)."""

__all__ = ["export_module"]


def __getattr__(name: str):
    if name == "export_module":
        from .pipeline import export_module

        return export_module
    raise AttributeError(name)
