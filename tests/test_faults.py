"""The fault suite: lmrt used as a hostile user would — bad numbers, empty strings, text that is not
UTF-8, files where directories belong and the reverse, damaged and tampered model directories,
interruptions.

Every CLI case checks the exit status, one ``error:`` line naming what was wrong (and no
traceback), and that nothing was written or left behind: the work directory, which holds the
model, the sources and every output path, is the same file for file afterwards. Add a case by
adding a row to ``CASES``; Python API cases and kill tests follow the table.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from lmrt import runtime
from lmrt.cli import main
from lmrt.export import ExportError, export_model
from lmrt.quantize import QuantizeError, quantize_directory, scheme_for
from lmrt.runtime.compat import installed_onnxruntime
from lmrt.runtime.manifest import ManifestError
from lmrt.runtime.model import LoadedModel
from lmrt.runtime.model_dir import OutputError
from lmrt.runtime.scoring import windows
from lmrt.runtime.session import GraphError, create_session

quiet = dict(progress=lambda _: None)


# ---------------------------------------------------------------------------------------------
# The work directory of one case: a copy of an exported tiny Llama ("model"), the other family's
# export ("other"), the Hugging Face source ("hf"), a few hostile files, and room for outputs.


def _set(section: str, key: str, value) -> Callable[[Path], None]:
    """Edit one field of model/lmrt.json."""

    def prepare(work: Path) -> None:
        path = work / "model" / "lmrt.json"
        data = json.loads(path.read_text())
        data[section][key] = value
        path.write_text(json.dumps(data))

    return prepare


def _external_location(location: str) -> Callable[[Path], None]:
    """Point every external-data tensor of model/model.onnx at ``location``."""

    def prepare(work: Path) -> None:
        path = work / "model" / "model.onnx"
        model = onnx.load(str(path), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        onnx.save(model, str(path))

    return prepare


def _truncate(name: str, keep: int) -> Callable[[Path], None]:
    def prepare(work: Path) -> None:
        path = work / name
        path.write_bytes(path.read_bytes()[:keep])

    return prepare


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    def prepare(work: Path) -> None:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_bytes(data)

    return prepare


def _link(name: str, target: str) -> Callable[[Path], None]:
    def prepare(work: Path) -> None:
        os.symlink(work / target, work / name)

    return prepare


def _copy(source: str, destination: str) -> Callable[[Path], None]:
    def prepare(work: Path) -> None:
        src, dst = work / source, work / destination
        shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)

    return prepare


def _steps(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def prepare(work: Path) -> None:
        for step in steps:
            step(work)

    return prepare


def _replace_with_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _foreign_graph(work: Path) -> None:
    """An ONNX graph that is no lmrt export (one Add), under the manifest of the model."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "foreign", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    (work / "model" / "model.onnx").unlink()
    onnx.save(model, str(work / "model" / "model.onnx"))


def _tiny_gguf(path: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list(["a", "b", "c"])
    writer.add_tensor("token_embd.weight", np.ones((64, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def work(tmp_path, tiny_models) -> Path:
    hf, _, exported = tiny_models["llama"]
    shutil.copytree(exported, tmp_path / "model")
    shutil.copytree(tiny_models["gpt2"][2], tmp_path / "other")
    shutil.copytree(hf, tmp_path / "hf")
    (tmp_path / "notes.txt").write_text("a plain file, not a directory\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e ".encode("latin-1") * 20)
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "texts").mkdir()
    _tiny_gguf(tmp_path / "cut.gguf")
    _truncate("cut.gguf", os.path.getsize(tmp_path / "cut.gguf") - 100)(tmp_path)
    (tmp_path / "fake.gguf").write_text("this is not a GGUF file\n")
    return tmp_path


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root``: kind, and for files size, mtime and content hash."""
    import hashlib

    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir",)
            else:
                st = path.stat()
                out[rel] = ("file", st.st_size, st.st_mtime_ns, hashlib.blake2b(path.read_bytes()).hexdigest())
    return out


# ---------------------------------------------------------------------------------------------
# The table. {model}, {other}, {hf}, {work} and {file} stand for paths in the work directory.


@dataclass(frozen=True)
class Case:
    args: tuple
    message: str  # a fragment of the one error line
    prepare: Callable[[Path], None] | None = None
    cwd: str = ""  # relative to the work directory
    process: bool = False  # run `python -m lmrt` for real: bytes in argv or on stdin
    stdin: bytes | None = None
    loads: bool = False  # export starts loading the source (prints "… loading") before it fails


def case(id: str, *args, message: str, **kwargs):
    return pytest.param(Case(args, message, **kwargs), id=id)


CASES = [
    # eval: windows, strides, texts
    case("eval-window-1-loops-no-more", "eval", "{model}", "--window", "1", "--max-tokens", "10", message="--window must be a whole number of tokens, at least 2"),
    case("eval-window-0", "eval", "{model}", "--window", "0", message="--window must be"),
    case("eval-stride-0", "eval", "{model}", "--stride", "0", message="--stride must be"),
    case("eval-stride-above-window", "eval", "{model}", "--window", "10", "--stride", "11", message="--stride must be a whole number of tokens from 1 to the window (10)"),
    case("eval-window-beyond-context", "eval", "{model}", "--window", "500", message="--window is 500 tokens, more than the model's context (128)"),
    case("eval-window-not-a-number", "eval", "{model}", "--window", "abc", message="Invalid value for '--window'"),
    case("eval-max-tokens-1", "eval", "{model}", "--max-tokens", "1", message="--max-tokens must be"),
    case("eval-text-empty-path", "eval", "{model}", "--text", "", message="--text is an empty path"),
    case("eval-text-directory", "eval", "{model}", "--text", "{work}/texts", message="is a directory"),
    case("eval-text-missing", "eval", "{model}", "--text", "{work}/absent.txt", message="cannot read --text"),
    case("eval-text-not-utf8", "eval", "{model}", "--text", "{work}/latin1.txt", message="is not UTF-8 text"),
    case("eval-text-empty-file", "eval", "{model}", "--text", "{work}/empty.txt", message="scoring needs at least 2"),
    case("eval-text-a-device", "eval", "{model}", "--text", os.devnull, message="is a device, not a text file"),
    case("eval-threads-huge", "eval", "{model}", "--threads", "100000", message="--threads must be a positive integer"),
    # export: flags, outputs, --force, the gate's options, sources
    case("export-int8-and-int4", "export", "{hf}", "-o", "{work}/out", "--int8", "--int4", message="--int8 and --int4 exclude each other"),
    case("export-fp16-and-int8", "export", "{hf}", "-o", "{work}/out", "--fp16", "--int8", message="--fp16 and --int8 exclude each other"),
    case("export-output-empty", "export", "{hf}", "-o", "", message="-o/--output is an empty path"),
    case("export-output-empty-force", "export", "{hf}", "-o", "", "--force", message="-o/--output is an empty path", cwd="model"),
    case("export-output-exists", "export", "{hf}", "-o", "{model}", message="already exists; pass --force"),
    case("export-force-not-a-model-dir", "export", "{hf}", "-o", "{work}/texts", "--force", message="is not an lmrt model directory"),
    case("export-force-a-file", "export", "{hf}", "-o", "{file}", "--force", message="is not an lmrt model directory"),
    case("export-force-current-dir", "export", "{hf}", "-o", ".", "--force", message="which holds the current directory", cwd="model"),
    case(
        "export-force-parent-of-current-dir", "export", "{hf}", "-o", "{model}", "--force",
        message="which holds the current directory", prepare=_write("model/sub/x", b""), cwd="model/sub",
    ),
    case(
        "export-force-holds-the-source", "export", "{model}/hf", "-o", "{model}", "--force",
        message="which holds the source", prepare=_copy("hf", "model/hf"),
    ),
    case("export-output-under-a-file", "export", "{hf}", "-o", "{file}/out", message="is not a directory"),
    case("export-tolerance-nan", "export", "{hf}", "-o", "{work}/out", "--tolerance", "nan", message="--tolerance must be a finite number above 0"),
    case("export-tolerance-negative", "export", "{hf}", "-o", "{work}/out", "--tolerance", "-1", message="--tolerance must be"),
    case("export-ppl-negative", "export", "{hf}", "-o", "{work}/out", "--int8", "--max-ppl-increase", "-5", message="--max-ppl-increase must be a finite number of percent"),
    case("export-ppl-infinite", "export", "{hf}", "-o", "{work}/out", "--int4", "--max-ppl-increase", "inf", message="--max-ppl-increase must be"),
    case("export-eval-text-missing", "export", "{hf}", "-o", "{work}/out", "--int8", "--eval-text", "{work}/absent.txt", message="cannot read --eval-text"),
    case("export-eval-text-not-utf8", "export", "{hf}", "-o", "{work}/out", "--int8", "--eval-text", "{work}/latin1.txt", message="--eval-text"),
    case("export-gate-option-without-int", "export", "{hf}", "-o", "{work}/out", "--eval-text", "{file}", message="apply to --int8 / --int4 only"),
    case("export-gguf-truncated", "export", "{work}/cut.gguf", "-o", "{work}/out", message="cut.gguf is truncated", loads=True),
    case("export-gguf-not-gguf", "export", "{work}/fake.gguf", "-o", "{work}/out", message="is not a GGUF file", loads=True),
    case("export-source-missing", "export", "{work}/absent.gguf", "-o", "{work}/out", message="GGUF file not found"),
    case("export-source-empty", "export", "", "-o", "{work}/out", message="SOURCE is an empty path"),
    # quantize
    case("quantize-int8-and-int4", "quantize", "{model}", "-o", "{work}/out", "--int8", "--int4", message="--int8 and --int4 exclude each other"),
    case("quantize-no-scheme", "quantize", "{model}", "-o", "{work}/out", message="choose --int8 or --int4"),
    case("quantize-gguf-empty", "quantize", "{model}", "-o", "{work}/out", "--int8", "--gguf", "", message="--gguf is an empty path"),
    case("quantize-gguf-truncated", "quantize", "{model}", "-o", "{work}/out", "--int8", "--gguf", "{work}/cut.gguf", message="is truncated"),
    case("quantize-gguf-not-gguf", "quantize", "{model}", "-o", "{work}/out", "--int8", "--gguf", "{file}", message="is not a GGUF file"),
    case("quantize-ppl-nan", "quantize", "{model}", "-o", "{work}/out", "--int8", "--max-ppl-increase", "nan", message="--max-ppl-increase must be"),
    case("quantize-into-itself", "quantize", "{model}", "-o", "{model}", "--int8", "--force", message="different directory from the source"),
    case("quantize-force-not-a-model-dir", "quantize", "{model}", "-o", "{work}/texts", "--int8", "--force", message="is not an lmrt model directory"),
    case("quantize-eval-text-directory", "quantize", "{model}", "-o", "{work}/out", "--int8", "--eval-text", "{work}/texts", message="--eval-text"),
    case("quantize-source-is-a-file", "quantize", "{file}", "-o", "{work}/out", "--int8", message="is a file"),
    # generate and chat: options accepted without effect, text that is not UTF-8
    case("generate-system-without-chat", "generate", "{model}", "hi", "--system", "Be brief.", message="--system applies to --chat only"),
    case("generate-threads-0", "generate", "{model}", "hi", "--threads", "0", message="--threads must be a positive integer"),
    case("generate-threads-huge", "generate", "{model}", "hi", "--threads", "100000", message="--threads must be"),
    case("generate-beams-beyond-memory", "generate", "{model}", "hi", "-b", "50000000", "-n", "64", message="--num-beams is 50000000: 50000000 sequences"),
    case("generate-samples-beyond-memory", "generate", "{model}", "hi", "-N", "50000000", "-t", "1", message="--num-return-sequences is 50000000"),
    case("generate-stop-id-beyond-vocabulary", "generate", "{model}", "hi", "--stop-token-id", "1000000", message="--stop-token-id must be token ids below the vocabulary size"),
    case("generate-top-p-named-by-flag", "generate", "{model}", "hi", "--top-p", "2", message="--top-p must be a number in (0, 1]"),
    case("generate-speculation-unknown", "generate", "{model}", "hi", "--speculation", "maybe", message="--speculation"),
    case("generate-stdin-twice", "generate", "{model}", "-", "-", message='PROMPT "-" (stdin) may be given once'),
    case("generate-model-dir-empty", "generate", "", "hi", message="MODEL_DIR is an empty path"),
    case("generate-prompt-argv-not-utf8", "generate", "{model}", b"caf\xe9", message="PROMPT is not valid UTF-8 text", process=True),
    case("generate-stop-argv-not-utf8", "generate", "{model}", "hi", "--stop", b"\xff", message="--stop is not valid UTF-8 text", process=True),
    case("generate-stdin-not-utf8", "generate", "{model}", "-", message="stdin (PROMPT \"-\") is not UTF-8 text", process=True, stdin=b"caf\xe9\n"),
    case("chat-system-argv-not-utf8", "chat", "{model}", "--system", b"\xff", message="--system is not valid UTF-8 text", process=True),
    case("chat-threads-negative", "chat", "{model}", "--threads", "-1", message="--threads must be"),
    case("bench-threads-huge", "bench", "{model}", "--threads", "100000", message="--threads must be"),
    case("bench-prompt-tokens-negative", "bench", "{model}", "--prompt-tokens", "-5", message="--prompt-tokens must be at least 1"),
    # model directories that escape, are damaged, or were put together from different exports
    case("info-graph-absolute-path", "info", "{model}", message="graph.file in lmrt.json is an absolute path", prepare=lambda w: _set("graph", "file", str(w / "other" / "model.onnx"))(w)),
    case("generate-graph-dotdot", "generate", "{model}", "hi", message="graph.file in lmrt.json is ../other/model.onnx, which leads out", prepare=_set("graph", "file", "../other/model.onnx")),
    case(
        "info-graph-link-out", "info", "{model}", message="graph.file in lmrt.json is g.onnx, which resolves (through a link)",
        prepare=_steps(_link("model/g.onnx", "other/model.onnx"), _set("graph", "file", "g.onnx")),
    ),
    case("info-graph-is-the-directory", "info", "{model}", message="the model directory itself", prepare=_set("graph", "file", ".")),
    case("generate-tokenizer-absolute", "generate", "{model}", "hi", message="tokenizer.file in lmrt.json is an absolute path", prepare=_set("tokenizer", "file", "/etc/hostname")),
    case("bench-data-file-dotdot", "bench", "{model}", message="graph.data_file in lmrt.json", prepare=_set("graph", "data_file", "../other/model.onnx.data")),
    case("generate-external-data-dotdot", "generate", "{model}", "hi", message="the external data of tensor", prepare=_external_location("../other/model.onnx.data")),
    case("info-external-data-absolute", "info", "{model}", message="is an absolute path", prepare=lambda w: _external_location(str(w / "other" / "model.onnx.data"))(w)),
    case(
        "eval-external-data-link-out", "eval", "{model}", message="which resolves (through a link)",
        prepare=_steps(_external_location("w.data"), _link("model/w.data", "other/model.onnx.data")),
    ),
    case("generate-graph-truncated", "generate", "{model}", "hi", message="model.onnx is truncated", prepare=_truncate("model/model.onnx", 3000)),
    case("info-graph-empty", "info", "{model}", message="model.onnx is empty", prepare=_write("model/model.onnx", b"")),
    case("generate-graph-not-onnx", "generate", "{model}", "hi", message="not a complete ONNX graph", prepare=_write("model/model.onnx", b"hello world\n")),
    case("generate-external-data-truncated", "generate", "{model}", "hi", message="model.onnx.data is truncated", prepare=_truncate("model/model.onnx.data", 3000)),
    case("chat-external-data-missing", "chat", "{model}", message="model.onnx.data is missing", prepare=lambda w: (w / "model" / "model.onnx.data").unlink()),
    case(
        "generate-graph-of-another-model", "generate", "{model}", "hi", message="model.onnx does not match lmrt.json",
        prepare=_steps(_copy("other/model.onnx", "model/model.onnx"), _copy("other/model.onnx.data", "model/model.onnx.data")),
    ),
    case("eval-foreign-graph", "eval", "{model}", message="does not match lmrt.json: input 'input_ids' is missing", prepare=_foreign_graph),
    case("generate-tokenizer-corrupt", "generate", "{model}", "hi", message="tokenizer.json is not a tokenizer", prepare=_write("model/tokenizer.json", b'{"version": ')),
    case("info-manifest-a-list", "info", "{model}", message="not an lmrt manifest", prepare=_write("model/lmrt.json", b"[]")),
    case("info-manifest-not-utf8", "info", "{model}", message="lmrt.json is not valid JSON", prepare=_write("model/lmrt.json", b"\xff\xfe{")),
    case("info-manifest-wrong-type", "info", "{model}", message="architecture.num_layers must be int", prepare=_set("architecture", "num_layers", "2")),
    case("generate-manifest-zero-layers", "generate", "{model}", "hi", message="architecture.num_layers must be at least 1", prepare=_set("architecture", "num_layers", 0)),
    case("info-manifest-is-a-directory", "info", "{model}", message="has no lmrt.json", prepare=lambda w: _replace_with_directory(w / "model" / "lmrt.json")),
    case("generate-graph-is-a-directory", "generate", "{model}", "hi", message="model.onnx is not a file", prepare=lambda w: _replace_with_directory(w / "model" / "model.onnx")),
    case("generate-tokenizer-missing", "generate", "{model}", "hi", message="tokenizer.json is missing", prepare=lambda w: (w / "model" / "tokenizer.json").unlink()),
    case("generate-tokenizer-not-a-tokenizer", "generate", "{model}", "hi", message="is not a tokenizer", prepare=_write("model/tokenizer.json", b"{}")),
    case("info-model-dir-is-a-file", "info", "{model}/lmrt.json", message="is a file; give the model directory"),
    case("info-model-dir-missing", "info", "{work}/absent", message="model directory not found"),
]


def _expand(arg, work: Path):
    paths = {
        "{model}": work / "model", "{other}": work / "other", "{hf}": work / "hf", "{work}": work, "{file}": work / "notes.txt"
    }
    if isinstance(arg, bytes):
        for key, path in paths.items():
            arg = arg.replace(key.encode(), os.fsencode(path))
        return arg
    for key, path in paths.items():
        arg = arg.replace(key, str(path))
    return arg


def run_lmrt(args: list, cwd: Path | None = None, stdin: bytes | None = None) -> tuple[int, str]:
    """``python -m lmrt ARGS`` as a real process; (exit status, stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "lmrt", *args], cwd=cwd, input=stdin or b"", capture_output=True, timeout=120
    )
    return done.returncode, done.stderr.decode("utf-8", "backslashreplace")


def assert_one_error_line(stderr: str, message: str) -> None:
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert "Traceback" not in stderr, stderr
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    assert message in errors[0], stderr


@pytest.mark.parametrize("c", CASES)
def test_cli_refuses_with_one_line_and_leaves_nothing(c: Case, work: Path, monkeypatch):
    if c.prepare:
        c.prepare(work)
    before = snapshot(work)
    args = [_expand(a, work) for a in c.args]
    cwd = work / c.cwd
    if c.process:
        status, stderr = run_lmrt(args, cwd=cwd, stdin=c.stdin)
    else:
        monkeypatch.chdir(cwd)
        result = CliRunner().invoke(main, args, input=c.stdin)
        status, stderr = result.exit_code, result.stderr
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert status == 1, stderr
    assert_one_error_line(stderr, c.message)
    assert ("… loading" in stderr) == c.loads, "checked only after loading started"
    assert snapshot(work) == before


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux's /sys, where no one may make a directory")
def test_export_to_a_read_only_location_fails_before_loading(work):
    started = time.perf_counter()
    result = CliRunner().invoke(main, ["export", str(work / "hf"), "-o", "/sys/lmrt-model"])
    assert result.exit_code == 1
    assert_one_error_line(result.stderr, "cannot write /sys/lmrt-model: /sys is not writable")
    assert "loading" not in result.stderr and time.perf_counter() - started < 30
    assert not os.path.exists("/sys/lmrt-model")


def test_chat_skips_a_line_that_is_not_utf8_and_goes_on(work):
    path = work / "model"
    data = json.loads((path / "lmrt.json").read_text())
    data["tokenizer"]["chat_template"] = "{% for m in messages %}{{ m.content }}\n{% endfor %}"
    (path / "lmrt.json").write_text(json.dumps(data))
    status, stderr = run_lmrt(["chat", str(path), "-n", "2"], stdin=b"caf\xe9\nhello\n")
    assert status == 0, stderr
    assert "[that line is not UTF-8 text; type it again]" in stderr and "Traceback" not in stderr


def test_output_to_a_closed_pipe_stops_quietly(work):
    """`lmrt info MODEL | head -1`: the reader is gone; no traceback, no error line, SIGPIPE's status."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "lmrt", "info", str(work / "model")], stdout=write, stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 128 + signal.SIGPIPE and done.stderr == b""


def test_info_shows_the_rest_when_a_record_is_damaged(work):
    _set("validation", "max_abs_diff", "large")(work)
    result = CliRunner().invoke(main, ["info", str(work / "model")])
    assert result.exit_code == 0 and "validation     unreadable in lmrt.json" in result.stdout


# ---------------------------------------------------------------------------------------------
# The Python API: the same refusals, as exceptions with one-line messages.


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_api_scoring_refuses_windows_that_cannot_progress(tiny_models):
    gen = runtime.Generator(tiny_models["llama"][2])
    ids = gen.encode("The capital of France is Paris. " * 3)
    for window, stride, message in [(1, None, "window must be"), (0, None, "window must be"), (8, 0, "stride must be"),
                                     (8, 9, "stride must be"), (500, None, "more than the model's context"), (True, None, "window must be")]:
        with pytest.raises(ValueError) as e:
            gen.score(ids, window=window, stride=stride)
        assert message in _one_line(e)
    with pytest.raises(ValueError, match="window >= 2"):
        windows(10, 1, 1)


def test_api_generator_refuses_a_manifest_that_escapes(work):
    _set("graph", "file", "../other/model.onnx")(work)
    with pytest.raises(ManifestError) as e:
        runtime.Generator(work / "model")
    assert "leads out" in _one_line(e)


def test_api_onnxruntime_refusing_escaping_external_data_is_one_line(work):
    _external_location("../other/model.onnx.data")(work)  # past load_manifest, onnxruntime refuses it itself
    with pytest.raises(GraphError) as e:
        create_session(str(work / "model" / "model.onnx"), "cpu", str(work / "model"))
        # reached on older releases (1.23 and before), which follow the path; lmrt's own check refuses
        # it first (case generate-external-data-dotdot)
        pytest.skip(f"onnxruntime {installed_onnxruntime()} reads external data outside the graph's folder")
    assert "onnxruntime cannot load" in _one_line(e) and "model.onnx" in str(e.value)


def test_api_model_refuses_a_graph_of_another_export(work, tiny_models):
    manifest = runtime.load_manifest(work / "model")
    with pytest.raises(GraphError) as e:
        LoadedModel(str(work / "other"), manifest=manifest)  # the gpt2 graph under the llama manifest
    assert "does not match lmrt.json" in _one_line(e)


def test_api_threads_are_bounded(tiny_models):
    for threads in (0, -3, 10**6, 2.5):
        with pytest.raises(ValueError, match="threads must be a positive integer"):
            runtime.Generator(tiny_models["llama"][2], threads=threads)


@pytest.mark.parametrize(
    "prompt,error,message",
    [
        (b"hi", TypeError, "a prompt is a str or a list of token ids, got bytes"),
        (123, TypeError, "a prompt is a str or a list of token ids, got int"),
        ([1, "two"], ValueError, "must hold integers from 0 to"),
        ([1, 10**9], ValueError, "must hold integers from 0 to"),
        ([True, 2], ValueError, "must hold integers from 0 to"),
        ("", ValueError, "the prompt is empty"),
    ],
    ids=["bytes", "int", "mixed-ids", "id-beyond-vocabulary", "bool-ids", "empty"],
)
def test_api_prompts_of_the_wrong_kind_are_named(tiny_models, prompt, error, message):
    gen = runtime.Generator(tiny_models["llama"][2])
    for call in (gen.generate, lambda p, **o: gen.generate_batch([p], **o), gen.stream):
        with pytest.raises(error, match=message):
            call(prompt, max_new_tokens=2)
    assert not gen._loop.busy  # nothing was queued


def test_api_options_of_the_wrong_kind_are_named(tiny_models):
    gen = runtime.Generator(tiny_models["llama"][2])
    with pytest.raises(ValueError, match="stop_token_ids must be token ids below the vocabulary size"):
        gen.generate("hi", stop_token_ids=[10**6])
    with pytest.raises(ValueError, match="num_beams is 50000000"):
        gen.generate("hi", num_beams=50_000_000, max_new_tokens=8)
    with pytest.raises(ValueError, match="logprobs must be an integer from 0 to 20"):
        gen.generate_batch(["hi"], logprobs=-1)


def test_api_export_checks_everything_before_loading(work):
    hf, out = str(work / "hf"), str(work / "out")
    before = snapshot(work)
    with pytest.raises(OutputError, match="the output path is empty"):
        export_model(hf, "", **quiet)
    with pytest.raises(OutputError, match="not an lmrt model directory"):
        export_model(hf, str(work / "texts"), force=True, **quiet)
    with pytest.raises(ExportError, match="tolerance must be a positive number"):
        export_model(hf, out, tolerance=math.inf, **quiet)
    with pytest.raises(QuantizeError, match="allowed perplexity increase must be a finite fraction"):
        export_model(hf, out, precision="int8", max_increase=-0.1, **quiet)
    with pytest.raises(QuantizeError, match="not UTF-8"):
        export_model(hf, out, precision="int4", eval_text=str(work / "latin1.txt"), **quiet)
    with pytest.raises(ExportError, match="apply to int8 / int4 exports only"):
        export_model(hf, out, eval_text=str(work / "notes.txt"), **quiet)
    assert snapshot(work) == before


def test_api_quantize_checks_before_reading_weights(work):
    model, out = str(work / "model"), str(work / "out")
    before = snapshot(work)
    with pytest.raises(QuantizeError, match="finite fraction"):
        quantize_directory(model, out, scheme_for("int8"), max_increase=float("nan"), **quiet)
    with pytest.raises(QuantizeError, match="is truncated"):
        quantize_directory(model, out, scheme_for("int8"), gguf=str(work / "cut.gguf"), **quiet)
    with pytest.raises(QuantizeError, match="empty path"):
        quantize_directory(model, out, scheme_for("int8"), eval_text="", **quiet)
    assert snapshot(work) == before


# ---------------------------------------------------------------------------------------------
# Interruptions: a real `lmrt export` process, signalled once it has started writing its output.


def _hidden(parent: Path, name: str) -> list[str]:
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{name}.") and "-" in n)


def _start_export(hf: str, out: Path) -> subprocess.Popen:
    def default_sigint():  # a background job may inherit SIGINT ignored; Python then never raises KeyboardInterrupt
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    return subprocess.Popen(
        [sys.executable, "-m", "lmrt", "export", hf, "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint,
    )


def _when_writing(process: subprocess.Popen, out: Path, timeout: float = 120.0) -> str:
    """Wait until the export has made its partial directory; returns its name."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        partial = [n for n in _hidden(out.parent, out.name) if ".partial-" in n]
        if partial:
            return partial[0]
        assert process.poll() is None, process.communicate()[1].decode()
        time.sleep(0.01)
    process.kill()
    raise AssertionError("the export never started writing")


@pytest.mark.parametrize("sig,status,name", [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")])
def test_export_interrupted_removes_its_partial_directory(tiny_models, tmp_path, sig, status, name):
    out = tmp_path / "model"
    process = _start_export(tiny_models["llama"][0], out)
    partial = _when_writing(process, out)
    assert partial.startswith(f".model.partial-{process.pid}-")
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    stderr = stderr.decode()
    assert process.returncode == status, stderr
    assert_one_error_line(stderr, f"interrupted by {name}; nothing was written to")
    assert os.listdir(tmp_path) == []


def test_export_killed_leaves_a_partial_directory_the_next_run_removes(tiny_models, tmp_path):
    out = tmp_path / "model"
    process = _start_export(tiny_models["llama"][0], out)
    partial = _when_writing(process, out)
    process.kill()
    process.communicate(timeout=60)
    assert _hidden(tmp_path, "model") and not out.exists()  # SIGKILL leaves it: nothing can run then
    status, stderr = run_lmrt(["export", tiny_models["llama"][0], "-o", str(out)])
    assert status == 0, stderr
    removed = [line for line in stderr.splitlines() if line.startswith("removed what an interrupted run left behind")]
    assert len(removed) == 1 and partial in removed[0], stderr
    assert os.listdir(tmp_path) == ["model"]
    assert runtime.Generator(out).generate("The", max_new_tokens=3, stop_token_ids=[])


def test_a_running_export_keeps_its_directory_from_another_run(tiny_models, tmp_path):
    """Leftovers are only those of processes that are gone: a live run's directory stays."""
    from lmrt.runtime.model_dir import remove_leftovers

    out = tmp_path / "model"
    live = tmp_path / f".model.partial-{os.getpid()}-abcd"
    dead = tmp_path / ".model.fp32-999999999-abcd"
    other = tmp_path / ".modelx.partial-999999999-abcd"
    for path in (live, dead, other):
        path.mkdir()
    said = []
    assert remove_leftovers(str(out), said.append) == [str(dead)]
    assert live.exists() and other.exists() and not dead.exists() and len(said) == 1
