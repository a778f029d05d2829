"""The documentation: its generated parts are up to date, the site builds, the README stays short
and starts with the set-up commands, and every relative link leads to a file."""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import subprocess
import sys

import pytest

import gen_docs  # scripts/, on the path through conftest.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
SETUP_COMMANDS = ["bash scripts/quickstart.sh", "bash scripts/test.sh"]


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_generated_parts_are_up_to_date():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "gen_docs.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert gen_docs.stale_pages() == []


def test_a_tampered_generated_part_is_detected_and_rewritten(tmp_path):
    original = read(gen_docs.CLI_PAGE)
    tampered = original.replace("| `top_p` | `--top-p` | `1.0` |", "| `top_p` | `--top-p` | `0.9` |")
    tampered = tampered.replace("### lmrt serve", "### lmrt server")
    assert tampered.count("0.9` |") and "lmrt server" in tampered
    parts = gen_docs.GENERATED[gen_docs.CLI_PAGE]
    assert gen_docs.render(tampered, parts) == original
    page = tmp_path / "cli.md"
    page.write_text(tampered, encoding="utf-8")
    assert gen_docs.stale_pages({str(page): parts}) == [str(page)]
    page.write_text(original + "\nHand-written text after the generated parts stays.\n", encoding="utf-8")
    assert gen_docs.stale_pages({str(page): parts}) == []


def test_check_names_the_stale_file(tmp_path, monkeypatch, capsys):
    page = tmp_path / "cli.md"
    page.write_text(read(gen_docs.CLI_PAGE).replace("### lmrt eval", "### lmrt evaluate"), encoding="utf-8")
    monkeypatch.setattr(gen_docs, "GENERATED", {str(page): gen_docs.GENERATED[gen_docs.CLI_PAGE]})
    assert gen_docs.main(["--check"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cli.md" in err and "out of date" in err


def test_missing_markers_are_an_error():
    with pytest.raises(ValueError, match="generated: cli-reference"):
        gen_docs.fill("no markers here\n", "cli-reference", "text")


def test_the_reference_covers_every_command_option_and_field():
    from lmrt.cli import main
    from lmrt.runtime.config import GenerationConfig

    text = read(gen_docs.CLI_PAGE)
    for name, command in main.commands.items():
        assert f"### lmrt {name}\n" in text
        for param in command.params:
            for opt in getattr(param, "opts", []) if param.param_type_name == "option" else []:
                assert f"`{opt}" in text, opt
    for field in GenerationConfig.options():
        assert f"| `{field.name}` |" in text


def test_mkdocs_builds_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_is_short_and_starts_with_the_setup_commands():
    text = read(README)
    assert len(text.splitlines()) <= 250
    first_block = re.search(r"^```\w*\n(.*?)^```", text, re.S | re.M)
    assert first_block is not None
    assert "\n## " not in text[: first_block.start()], "the set-up commands come before any section"
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines() if line.strip()]
    assert commands == SETUP_COMMANDS


def markdown_files() -> list[str]:
    return [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def relative_links(text: str) -> list[str]:
    """The targets of the Markdown links in ``text`` that are neither URLs nor anchors, outside code."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_lead_to_files(path):
    links = relative_links(read(path))
    missing = [
        link for link in links if not os.path.exists(os.path.join(os.path.dirname(path), link.split("#")[0]))
    ]
    assert missing == []


def test_relative_links_are_found():
    assert relative_links("[a](docs/cli.md#x) [b](https://x.org) [c](#y) `[d](e.md)`") == ["docs/cli.md#x"]
    assert "docs/installing.md" in relative_links(read(README))


def layout_files(text: str) -> set[str]:
    """The source files docs/layout.md's tree lists: one per line, folders nest by two spaces."""
    tree = text.split("```\n", 2)[1]
    listed, stack = set(), []
    for line in tree.splitlines():
        if not line.strip() or not line.startswith((" ", "lmrt/", "runtime/", "export/", "quantize/")):
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        stack = stack[:depth] + [line.split()[0]]
        if stack[-1].endswith(".py"):
            listed.add("".join(stack))
    return listed


def test_the_layout_page_lists_every_source_file_once():
    listed = layout_files(read(os.path.join(ROOT, "docs", "layout.md")))
    actual = {
        os.path.relpath(p, ROOT).replace(os.sep, "/")
        for top in ("lmrt", "runtime", "export", "quantize")
        for p in glob.glob(os.path.join(ROOT, top, "**", "*.py"), recursive=True)
    }
    assert len(actual) > 90
    assert sorted(actual - listed) == [], "source files docs/layout.md does not list"
    assert sorted(listed - actual) == [], "files docs/layout.md lists that do not exist"
