"""The evaluation text of the quality gate.

It is read at run time from the Python reference manual that ships with every CPython install
(``pydoc_data.topics``, the text behind ``help("assignment")``), so nothing third-party is copied
into lmrt and every machine measures on the same words. Only the prose paragraphs are kept: grammar
rules and code examples say little about a language model's quality.
"""

from __future__ import annotations

import os
import re
import stat

from .errors import QuantizeError

# Topics in a fixed order; each is a few hundred words of English technical prose.
TOPICS = (
    "assignment", "augassign", "class", "conditional", "exceptions", "execmodel", "for", "function",
    "if", "import", "lambda", "naming", "numbers", "raise", "return", "try", "while", "with", "yield",
    "bltin-code-objects", "typesseq", "typesmapping", "specialnames", "truth", "in", "comparisons",
    "booleans", "attribute-access", "context-managers", "customization", "debugger", "del", "dict",
    "dynamic-features", "global", "identifiers", "nonlocal", "pass", "slicings", "string-methods",
)  # fmt: skip


class EvalTextError(QuantizeError):
    """An evaluation text that cannot be read, or no Python reference manual to fall back on."""


def read_text(path: str, what: str) -> str:
    """The UTF-8 text of the file ``path``; ``what`` names it in errors (an option, "the evaluation
    text")."""
    if not os.fspath(path).strip():
        raise EvalTextError(f"{what} is an empty path; name a UTF-8 text file")
    if os.path.isdir(path):
        raise EvalTextError(f"{what} {path} is a directory; name a UTF-8 text file")
    mode = os.stat(path).st_mode if os.path.exists(path) else 0
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        raise EvalTextError(f"{what} {path} is a device, not a text file")  # /dev/zero would never end
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise EvalTextError(f"cannot read {what} {path} ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EvalTextError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _paragraphs(text: str) -> list[str]:
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or lines[0].startswith((" ", "\t")) or set(lines[-1].strip()) <= set("*=-"):
            continue  # indented code / grammar, or a heading with its underline
        para = " ".join(line.strip() for line in lines)
        if len(para) >= 120 and para.count(" ") >= 15:
            out.append(para)
    return out


def reference_text(max_chars: int = 40_000) -> str:
    """English prose from the Python reference manual, about ``max_chars`` long."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip the documentation
        raise EvalTextError(
            "this Python has no pydoc_data (the reference manual); give an evaluation text with --eval-text"
        ) from None
    paragraphs: list[str] = []
    for name in TOPICS:
        paragraphs.extend(_paragraphs(topics.get(name, "")))
    text = "\n\n".join(paragraphs)
    if len(text) < 4_000:
        raise EvalTextError("the reference manual is too short here; give an evaluation text with --eval-text")
    return text[:max_chars]
