"""A module named on the command line: ``path/to/model.py:make_model`` (a function or class in a
Python file that builds the module, called with no arguments) and ``--weights`` (a state_dict,
read with ``torch.load(weights_only=True)``: tensors only, never code).

A file saved with ``torch.save(model)`` holds a pickled module; unpickling it would run whatever
code the file names, so it is refused with what to pass instead.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from ...runtime.errors import first_line
from ..errors import ExportError

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
PROGRAM_SUFFIX = ".pt2"  # a torch.export program (program.py)
PICKLED = (
    "{path} is not a state_dict of tensors ({why}); lmrt loads weights with torch.load(weights_only=True) and never "
    "unpickles a module, since unpickling runs code from the file: save model.state_dict() instead and pass the code "
    "that builds the module as path/to/model.py:make_model --weights FILE"
)


def is_module_source(source: str) -> bool:
    """Whether ``source`` names a module of one's own: ``file.py:factory``, a weights file, or a
    torch.export program (``.pt2``)."""
    path, _, name = source.rpartition(":")
    return (path.endswith(".py") and name.isidentifier()) or source.lower().endswith((*WEIGHT_SUFFIXES, PROGRAM_SUFFIX))


def build_module(source: str, weights: str | None):
    """The module ``source`` names, with ``weights`` loaded into it; ExportError in one line."""
    if source.lower().endswith(PROGRAM_SUFFIX):
        if weights is not None:
            raise ExportError(f"{source} holds its weights; a torch.export program takes no weights file")
        from .program import load_program, program_module

        return program_module(load_program(source), f"torch.export program {os.path.basename(source)}")
    if source.lower().endswith(WEIGHT_SUFFIXES):
        read_state_dict(source)  # a pickled module is refused here, saying why
        raise ExportError(f"{source} holds weights only; pass the code that builds the module: path/to/model.py:make_model --weights {source}")
    path, _, name = source.rpartition(":")
    if not os.path.isfile(path):
        raise ExportError(f"Python file not found: {path}")
    factory = getattr(_import_file(path), name, None)
    if not callable(factory):
        raise ExportError(f"{path} has no function or class {name!r} that builds the module")
    try:
        module = factory()
    except Exception as e:  # the user's code
        raise ExportError(f"{source}() failed: {type(e).__name__}: {first_line(e)}") from None
    import torch

    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"{source}() returned a {type(module).__name__}, not a torch.nn.Module")
    if weights is not None:
        state = read_state_dict(weights)
        try:
            module.load_state_dict(state)
        except RuntimeError as e:
            raise ExportError(f"{weights} does not fit the module {source}() builds: {' '.join(str(e).split())[:300]}") from None
    return module


def read_state_dict(path: str) -> dict:
    """The state_dict in ``path`` (or under "state_dict" / "model" in a checkpoint dict)."""
    import pickle

    import torch

    if not os.path.isfile(path):
        raise ExportError(f"weights file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ExportError(PICKLED.format(path=path, why=_unpickling_reason(e))) from None
    except Exception as e:  # not a torch file at all
        raise ExportError(f"cannot read {path} with torch.load: {first_line(e)}") from None
    for candidate in (data, *(data.get(k) for k in ("state_dict", "model") if isinstance(data, dict))):
        if isinstance(candidate, dict) and candidate and all(isinstance(v, torch.Tensor) for v in candidate.values()):
            return candidate
    raise ExportError(PICKLED.format(path=path, why=f"it holds a {type(data).__name__}"))


def _unpickling_reason(e: Exception) -> str:
    text = " ".join(str(e).split())
    marker = "Unsupported global: GLOBAL "
    if marker in text:
        return f"it pickles {text.split(marker, 1)[1].split()[0]}"
    return "it pickles objects other than tensors"


def _import_file(path: str):
    """The Python file ``path`` imported as a module of its own (its directory on sys.path while
    it imports, so it may import its neighbours)."""
    folder = os.path.dirname(os.path.abspath(path))
    spec = importlib.util.spec_from_file_location(f"lmrt_user_model_{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's code
        raise ExportError(f"importing {path} failed: {type(e).__name__}: {first_line(e)}") from None
    finally:
        sys.path.remove(folder)
    return module
