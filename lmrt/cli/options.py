"""Options shared by several commands: checked values, the generation options (one per
GenerationConfig field, from its metadata) and the runtime's --provider / --threads."""

from __future__ import annotations

import dataclasses
import typing

import click

from ..serve.settings import ServeSettings
from .errors import CliError, flag_of


def checked(test, requirement: str):
    """A click callback refusing a value for which ``test`` is false: "FLAG must be REQUIREMENT"."""

    def callback(ctx, param, value):
        if value is not None and not test(value):
            raise CliError(f"{flag_of(param)} must be {requirement}, got {value}")
        return value

    return callback


def at_least(minimum: int):
    return checked(lambda v: v >= minimum, f"a whole number, at least {minimum}")


def check_threads(ctx, param, value):
    """--threads: from 1 to this machine's CPUs."""
    from ..runtime.session import max_threads

    return checked(lambda v: 1 <= v <= max_threads(), f"a positive integer, at most {max_threads()} (this machine's CPUs)")(
        ctx, param, value
    )


def apply(fn, options: list):
    """``fn`` decorated with ``options``, the first of them shown first in --help."""
    for option in reversed(options):
        fn = option(fn)
    return fn


def generation_options(fn):
    """One CLI option per GenerationConfig field, built from the field's metadata (help, flag, short
    name, choices); unset options keep the model's defaults."""
    from ..runtime import GenerationConfig

    hints = typing.get_type_hints(GenerationConfig)
    for f in reversed([f for f in GenerationConfig.options() if f.metadata.get("cli", True)]):
        meta = f.metadata
        names = [meta["short"]] if meta.get("short") else []
        names.append(GenerationConfig.flag(f))
        kwargs = {"help": meta["help"], "multiple": bool(meta.get("multiple"))}
        if meta.get("choices"):
            kwargs["type"] = click.Choice(meta["choices"])
        elif meta.get("metavar") == "FILE":  # the option names a file; the field takes its text
            kwargs.update(type=click.Path(exists=True, dir_okay=False), metavar="FILE", callback=file_text)
        else:
            kwargs["type"] = scalar_type(hints[f.name])
        fn = click.option(*names, f.name, **kwargs)(fn)
    return fn


def file_text(ctx, param, path: str | None) -> str | None:
    """A click callback: the UTF-8 text of the file an option names."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise click.BadParameter(f"cannot read {path}: {e}") from None


def scalar_type(hint) -> type:
    """The click type of a field's type hint: ``int | None`` is int, ``tuple[str, ...]`` str."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return args[0]
    return scalar_type(args[0]) if args else hint


def given(options: dict) -> dict:
    """The generation options typed on the command line: a repeatable option never given is unset."""
    return {k: (None if v == () else v) for k, v in options.items()}


def settings_options(cls, names: tuple[str, ...] | None = None):
    """A decorator adding one option per field of the dataclass ``cls`` whose metadata names a flag
    (those in ``names`` when given), with the metadata's help and the field's default and type."""
    hints = typing.get_type_hints(cls)
    chosen = [f for f in dataclasses.fields(cls) if "flag" in f.metadata and (names is None or f.name in names)]

    def decorate(fn):
        for f in reversed(chosen):
            kwargs = {"type": scalar_type(hints[f.name]), "help": f.metadata["help"], "callback": CHECKS.get(f.name)}
            if kwargs["type"] is bool:  # a switch, off by default
                kwargs.update(type=None, is_flag=True, default=False)
            elif f.default is not None:
                kwargs.update(default=f.default, show_default=True)
            fn = click.option(f.metadata["flag"], f.name, **kwargs)(fn)
        return fn

    return decorate


CHECKS = {"threads": check_threads}  # settings checked as they are parsed, by click callbacks


def runtime_options(fn):
    """--provider and --threads, for every command that loads a model (as ``lmrt serve`` has them)."""
    return settings_options(ServeSettings, ("provider", "threads"))(fn)
