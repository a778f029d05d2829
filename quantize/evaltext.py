"""The evaluation text of the quality gate.

It is read at run time from the Python reference manual that ships with every CPython install
(``pydoc_data.topics``, the text behind ``help("assignment")``), so nothing third-party is copied
into lmrt and every machine measures on the same words. Only the prose paragraphs are kept: grammar
rules and code examples say little about a language model's quality.
"""

from __future__ import annotations

import re

# Topics in a fixed order; each is a few hundred words of English technical prose.
TOPICS = (
    "assignment", "augassign", "class", "conditional", "exceptions", "execmodel", "for", "function",
    "if", "import", "lambda", "naming", "numbers", "raise", "return", "try", "while", "with", "yield",
    "bltin-code-objects", "typesseq", "typesmapping", "specialnames", "truth", "in", "comparisons",
    "booleans", "attribute-access", "context-managers", "customization", "debugger", "del", "dict",
    "dynamic-features", "global", "identifiers", "nonlocal", "pass", "slicings", "string-methods",
)  # fmt: skip


class EvalTextError(RuntimeError):
    """The Python reference manual is not installed with this Python."""


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
