"""Write a model directory all at once: build it in a hidden temporary directory beside the target,
rename it into place at the end, and leave nothing behind when anything fails."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


def directory_size(path: str) -> int:
    """Bytes in the files of a model directory."""
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def check_target(output: str, force: bool) -> str:
    """The absolute target path; refuses an existing one unless ``force``."""
    output = os.path.abspath(output)
    if os.path.exists(output) and not force:
        raise FileExistsError(f"{output} already exists; pass --force to overwrite it")
    return output


@contextlib.contextmanager
def staged_directory(output: str) -> Iterator[str]:
    """Yields a fresh temporary directory; on a clean exit it replaces ``output``, otherwise it is
    removed and ``output`` is left as it was."""
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.partial-", dir=parent)
    try:
        yield tmp
        move_into_place(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def move_into_place(tmp: str, output: str) -> None:
    """Rename the finished directory to ``output``, replacing an old one only at the very end."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; give it a normal directory's mode
    for name in os.listdir(tmp):
        os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
    if not os.path.exists(output):
        os.rename(tmp, output)
        return
    old = f"{tmp}.old"  # beside it, so the rename stays on one filesystem
    os.rename(output, old)
    os.rename(tmp, output)
    if os.path.isdir(old):
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.remove(old)


GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


def save_graph(model, out_dir: str) -> tuple[str, str]:
    """Write an onnx ModelProto as ``model.onnx`` with its weights in ``model.onnx.data`` (graphs
    past 2 GB cannot be one protobuf file); returns the two file names."""
    import onnx

    onnx.save_model(
        model,
        os.path.join(out_dir, GRAPH_FILE),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=1024,
    )
    return GRAPH_FILE, DATA_FILE
