"""``lmrt doctor``: one screen of what this machine offers the runtime and what a model needs."""

from __future__ import annotations

import os
import platform
import sys

from .runtime.cpu import cpu_features, int8_products_line


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
        ("encoder int8", int8_products_line()),
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
