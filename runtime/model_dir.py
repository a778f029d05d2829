"""The model directory: the names of its files, and how it is written all at once.

A model directory holds ``lmrt.json`` (the manifest), the graph ``model.onnx`` with its weights in
``model.onnx.data``, and ``tokenizer.json``; export and quantize write these names, and the runtime
reads the files the manifest names.

It is built in a hidden directory beside the target and renamed into place at the end; nothing is
left behind when anything fails. The hidden directories are named ``.NAME.partial-PID-*`` (the
directory being written), ``.NAME.fp32-PID-*`` (an export's fp32 reference before quantization) and
``.NAME.probe-PID-*`` (the check that the location is writable), PID being the writing process. A
run killed outright (SIGKILL, a power cut) cannot remove them; the next run for the same target
does, once no process of that PID is running.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from typing import Callable, Iterable, Iterator


MANIFEST_FILE = "lmrt.json"
GRAPH_FILE = "model.onnx"
LORA_GRAPH_FILE = "model.lora.onnx"  # the graph once adapters are added: it takes their inputs too
ADAPTERS_DIR = "adapters"  # adapters/NAME/ holds adapter NAME's matrices
DATA_FILE = "model.onnx.data"  # the graph's weights: graphs past 2 GB cannot be one protobuf file
TOKENIZER_FILE = "tokenizer.json"
HIDDEN_KINDS = ("partial", "fp32", "probe")


class ManifestError(ValueError):
    """The model directory is missing, incomplete, of an unsupported format, or names files outside
    itself."""


class OutputError(ValueError):
    """The output path cannot be written or replaced; the message is one line meant for the user."""


def directory_size(path: str) -> int:
    """Bytes in the files of a model directory (subdirectories and broken links count nothing)."""
    total = 0
    for name in os.listdir(path):
        with contextlib.suppress(OSError):
            if os.path.isfile(os.path.join(path, name)):
                total += os.path.getsize(os.path.join(path, name))
    return total


def check_target(output: str, force: bool, sources: Iterable[str] = ()) -> str:
    """The absolute target path, once it is known that it can be written.

    Refuses an empty path; an existing one unless ``force``; with ``force``, anything but an lmrt
    model directory, and a directory holding the current directory or one of ``sources``; a target
    whose parent cannot be created or written."""
    if not os.fspath(output).strip():
        raise OutputError("the output path is empty")
    target = os.path.abspath(output)
    if os.path.lexists(target):
        if not force:
            raise OutputError(f"{target} already exists; pass --force to overwrite it")
        _check_replaceable(target, sources)
    _check_writable(target)
    return target


def _check_replaceable(target: str, sources: Iterable[str]) -> None:
    if not os.path.isdir(target) or not os.path.isfile(os.path.join(target, MANIFEST_FILE)):
        raise OutputError(
            f"{target} is not an lmrt model directory (it has no {MANIFEST_FILE}); --force replaces only "
            "those: remove it yourself or choose another output"
        )
    real = os.path.realpath(target)
    for what, path in (("the current directory", os.getcwd()), *(("the source", s) for s in sources)):
        inside = os.path.realpath(path)
        if inside == real or inside.startswith(real.rstrip(os.sep) + os.sep):
            raise OutputError(f"--force would replace {target}, which holds {what}; choose another output")


def _check_writable(target: str) -> None:
    """Whether a directory can be made beside ``target``: tried in its parent, or in the nearest
    existing ancestor when the parent is still to be created."""
    existing = os.path.dirname(target)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OutputError(f"cannot write {target}: {existing} is not a directory")
    try:
        probe = tempfile.mkdtemp(prefix=_hidden_prefix(target, "probe"), dir=existing)
    except OSError as e:
        raise OutputError(f"cannot write {target}: {existing} is not writable ({e.strerror})") from None
    os.rmdir(probe)


def _hidden_prefix(output: str, kind: str) -> str:
    return f".{os.path.basename(output)}.{kind}-{os.getpid()}-"


def _running(pid: int) -> bool:
    if os.name == "nt":  # signal 0 is not a probe on Windows: never take another run's directory
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: it exists
        return True
    return True


def remove_leftovers(output: str, report: Callable[[str], None]) -> list[str]:
    """Remove the hidden directories an interrupted run for ``output`` left beside it (those of
    running processes stay), saying so in one line; returns their paths."""
    parent, name = os.path.split(os.path.abspath(output))
    pattern = re.compile(rf"\.{re.escape(name)}\.(?:{'|'.join(HIDDEN_KINDS)})-(\d+)-")
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    removed = []
    for entry in sorted(entries):
        match = pattern.match(entry)
        if not match or _running(int(match.group(1))):
            continue
        path = os.path.join(parent, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)
        if not os.path.lexists(path):
            removed.append(path)
    if removed:
        report(f"removed what an interrupted run left behind: {', '.join(removed)}")
    return removed


@contextlib.contextmanager
def staged_directory(output: str) -> Iterator[str]:
    """Yields a fresh hidden directory beside ``output``; on a clean exit it replaces ``output``,
    otherwise it is removed and ``output`` is left as it was."""
    with _hidden_directory(output, "partial") as tmp:
        yield tmp
        move_into_place(tmp, output)


@contextlib.contextmanager
def scratch_directory(output: str, kind: str) -> Iterator[str]:
    """Yields a fresh hidden directory beside ``output`` for intermediate files; always removed."""
    with _hidden_directory(output, kind) as tmp:
        yield tmp


@contextlib.contextmanager
def _hidden_directory(output: str, kind: str) -> Iterator[str]:
    assert kind in HIDDEN_KINDS, kind
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    prefix, tmp = _hidden_prefix(output, kind), None
    try:
        tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
        yield tmp
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing left once moved into place
        else:  # interrupted (Ctrl-C) between making the directory and learning its name
            for entry in os.listdir(parent):
                if entry.startswith(prefix):
                    shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def move_into_place(tmp: str, output: str) -> None:
    """Rename the finished directory to ``output``, replacing an old one only at the very end."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; give it a normal directory's mode
    for name in os.listdir(tmp):
        os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
    if not os.path.lexists(output):
        os.rename(tmp, output)
        return
    old = f"{tmp}.old"  # beside it, so the rename stays on one filesystem
    os.rename(output, old)
    os.rename(tmp, output)
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.remove(old)
