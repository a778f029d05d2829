"""Write the generated parts of the documentation: the command reference of docs/cli.md, from the
click command tree, and its generation options table, from GenerationConfig's fields.

    python scripts/gen_docs.py           # rewrite them
    python scripts/gen_docs.py --check   # exit 1, naming the file, if they are out of date

A generated part lies between ``<!-- generated: NAME -->`` and ``<!-- end generated -->``; the
hand-written text around it is left as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys
import textwrap
from typing import Callable

import click

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI_PAGE = os.path.join(ROOT, "docs", "cli.md")
END = "<!-- end generated -->"


def prose(text: str) -> str:
    """Plain text as one line of Markdown: outside `code`, what Markdown would read as emphasis or
    HTML is escaped."""
    pieces = re.split(r"(`[^`]*`)", " ".join(text.split()))
    return "".join(p if i % 2 else p.replace("*", "\\*").replace("<", "&lt;") for i, p in enumerate(pieces))


def cell(text: str) -> str:
    """Text for a Markdown table cell: one line, pipes escaped."""
    return prose(text).replace("|", "\\|")


def help_markdown(text: str) -> str:
    """click help text as Markdown: paragraphs kept, a ``\\b`` paragraph (click's "do not rewrap")
    as a code block."""
    blocks = []
    for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(text)):
        if paragraph.startswith("\b"):
            body = textwrap.dedent(paragraph[1:].strip("\n"))
            blocks.append(f"```text\n{body}\n```")
        else:
            blocks.append(prose(paragraph))
    return "\n\n".join(blocks)


def metavar(param: click.Parameter, ctx: click.Context) -> str:
    try:
        return param.make_metavar(ctx)
    except TypeError:  # click before 8.2 takes no context
        return param.make_metavar()


def option_names(option: click.Option, ctx: click.Context) -> str:
    names = ", ".join(f"`{name}`" for name in option.opts + option.secondary_opts)
    if isinstance(option.type, click.Choice):
        names += f" ({', '.join(map(str, option.type.choices))})"
    elif not option.is_flag:
        names = names[:-1] + f" {metavar(option, ctx)}`"
    if option.multiple:
        names += " (repeatable)"
    return names


def option_default(option: click.Option, ctx: click.Context) -> str:
    if option.required:
        return "required"
    default = option.get_default(ctx, call=False)
    if callable(default):
        return "computed"
    if option.is_flag and not option.secondary_opts:
        return "on" if default else "off"
    if not isinstance(default, (str, int, float, tuple, list)) or default in ((), [], ""):
        return "—"  # None, or click's marker for "no default"
    return f"`{default}`"


def command_markdown(command: click.Command, ctx: click.Context, level: int) -> list[str]:
    lines = [f"{'#' * level} {ctx.command_path}", "", "```text", command.get_usage(ctx), "```", ""]
    if command.help:
        lines += [help_markdown(command.help), ""]
    help_option = command.get_help_option(ctx)
    options = [p for p in command.get_params(ctx) if isinstance(p, click.Option) and p is not help_option]
    if options:
        lines += ["| option | default | what it does |", "|---|---|---|"]
        for option in options:
            lines.append(f"| {option_names(option, ctx)} | {option_default(option, ctx)} | {cell(option.help or '')} |")
        lines.append("")
    if command.epilog:
        lines += [help_markdown(command.epilog), ""]
    if isinstance(command, click.Group):
        for name in sorted(command.commands):
            sub = command.commands[name]
            if not sub.hidden:
                lines += command_markdown(sub, click.Context(sub, info_name=name, parent=ctx), level + 1)
    return lines


def cli_reference() -> str:
    """Every command of ``lmrt``: its usage, its help, and each option with its default."""
    from lmrt.cli import main

    root = click.Context(main, info_name="lmrt", **main.context_settings)
    lines = ["Every command takes `-h`, `--help`; `lmrt --version` prints the version.", ""]
    for name in sorted(main.commands):
        command = main.commands[name]
        if not command.hidden:
            lines += command_markdown(command, click.Context(command, info_name=name, parent=root), 3)
    return "\n".join(lines).rstrip("\n")


def field_default(f: dataclasses.Field) -> str:
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return "none" if default is None or default == () else f"`{default}`"


def field_flag(f: dataclasses.Field) -> str:
    from lmrt.runtime.config import GenerationConfig

    meta = f.metadata
    if not meta.get("cli", True):
        return "Python only"
    names = [meta["short"]] if meta.get("short") else []
    flag = ", ".join(f"`{n}`" for n in names + [GenerationConfig.flag(f)])
    if meta.get("metavar"):
        flag = flag[:-1] + f" {meta['metavar']}`"
    if meta.get("choices"):
        flag += f" ({', '.join(meta['choices'])})"
    if meta.get("multiple"):
        flag += " (repeatable)"
    return flag


def generation_options() -> str:
    """Every GenerationConfig field: its name, its command-line flag, its default and its help."""
    from lmrt.runtime.config import GenerationConfig

    lines = ["| field | command-line flag | default | what it does |", "|---|---|---|---|"]
    for f in GenerationConfig.options():
        lines.append(f"| `{f.name}` | {field_flag(f)} | {field_default(f)} | {cell(f.metadata.get('help', ''))} |")
    return "\n".join(lines)


# page -> the generated parts it holds, by marker name
GENERATED: dict[str, dict[str, Callable[[], str]]] = {
    CLI_PAGE: {"generation-options": generation_options, "cli-reference": cli_reference},
}


def fill(text: str, name: str, content: str) -> str:
    """``text`` with the part between the markers of ``name`` replaced by ``content``."""
    begin = f"<!-- generated: {name} -->"
    pattern = re.compile(re.escape(begin) + r"\n.*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"no '{begin}' ... '{END}' markers")
    return pattern.sub(lambda _: f"{begin}\n{content}\n{END}", text, count=1)


def render(text: str, parts: dict[str, Callable[[], str]]) -> str:
    """``text`` with each generated part written afresh."""
    for name, make in parts.items():
        text = fill(text, name, make())
    return text


def stale_pages(generated: dict[str, dict[str, Callable[[], str]]] | None = None) -> list[str]:
    """The pages (by default every page in GENERATED) whose generated parts differ from what would
    be written now."""
    stale = []
    for path, parts in (GENERATED if generated is None else generated).items():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if render(text, parts) != text:
            stale.append(path)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated part is out of date")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_pages()
        if stale:
            names = ", ".join(os.path.relpath(p, ROOT) for p in stale)
            print(f"error: {names} is out of date: run python scripts/gen_docs.py", file=sys.stderr)
            return 1
        return 0
    for path, parts in GENERATED.items():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new = render(text, parts)
        if new != text:
            with open(path, "w", encoding="utf-8") as f:
                f.write(new)
            print(f"wrote {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
