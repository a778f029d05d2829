"""``lmrt doctor``: one screen of what this machine offers the runtime and what a model needs."""

from __future__ import annotations

import os
import platform
import sys

# CPU features onnxruntime's kernels choose between (x86: AVX2 / AVX-512 / VNNI / AMX for int8 and
# MatMulNBits; Arm: dot product, int8 matrix multiply, SVE), as /proc/cpuinfo names them.
CPU_FEATURES = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8",
    "asimd", "asimddp", "asimdhp", "i8mm", "sve", "sve2", "bf16",
)  # fmt: skip


def cpu_features(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """Those of ``CPU_FEATURES`` the CPU reports ("flags" on x86, "Features" on Arm), in that order."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return []
    found: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            found.update(value.split())
    return [f for f in CPU_FEATURES if f in found]


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def machine_rows() -> list[tuple[str, str]]:
    from .runtime.compat import profile_for

    rows = [
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", f"{platform.system()} {platform.machine()}, {os.cpu_count() or '?'} logical CPUs"),
        ("cpu features", ", ".join(cpu_features()) or "none of those onnxruntime uses (or /proc/cpuinfo unreadable)"),
    ]
    try:
        import onnxruntime as ort
    except ImportError:
        rows.append(("onnxruntime", "not installed: pip install 'lmrt[cpu]', 'lmrt[gpu]' or your platform's wheel"))
        ort = None
    if ort is not None:
        try:
            profile = f"export target {profile_for(ort.__version__).name}"
        except ValueError as e:
            profile = str(e)
        rows += [
            ("onnxruntime", f"{ort.__version__} ({os.path.dirname(ort.__file__)}); {profile}"),
            ("providers", ", ".join(ort.get_available_providers()) or "none"),
            ("device", ort.get_device()),
        ]
    rows += [("numpy", _version("numpy")), ("tokenizers", _version("tokenizers"))]
    return rows


def onnxruntime_needed(manifest, have: str | None) -> str:
    """What the directory needs of onnxruntime and whether ``have`` (the installed version) meets it:
    "onnxruntime 1.23 or newer (target ort-1.23, floor 1.19); installed 1.23.2: ok"."""
    from .runtime.compat import required, status_line

    line = status_line(manifest, have)
    return line if required(manifest) is None else f"onnxruntime {line}"


def model_rows(model_dir: str, manifest, have: str | None) -> list[tuple[str, str]]:
    from .precision import precision

    rows = [("model", f"{model_dir}: {manifest.task}, {precision(manifest)}")]
    rows.append(("needs", onnxruntime_needed(manifest, have)))
    forms = (manifest.requires or {}).get("forms") or {}
    if forms:
        rows.append(("operator forms", ", ".join(f"{f} {v}" for f, v in forms.items())))
    return rows
