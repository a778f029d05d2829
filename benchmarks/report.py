"""docs/benchmarks.md is written by several scripts, one section each: a script replaces its own
section (between ``<!-- section NAME -->`` and ``<!-- end NAME -->``) and leaves the others."""

from __future__ import annotations

import os
import platform
import re

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DOCS = os.path.join(ROOT, "docs", "benchmarks.md")
TITLE = "# Benchmarks\n\nEach section below is written by the script it names; compare ratios within a section, not figures across sections.\n"


def write_section(name: str, markdown: str, path: str = DOCS) -> None:
    begin, end = f"<!-- section {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}\n"
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else TITLE
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def machine() -> str:
    """The CPU and the features its kernels choose between, the cores this process may use, memory and
    the OS, in one line."""
    from lmrt.runtime.cpu import cpu_features

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    flags = " ".join(cpu_features()) or "none of avx2/avx512/vnni/amx/neon reported"
    return f"{cpu} (CPU flags: {flags}), {len(os.sched_getaffinity(0))} cores available, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"
