"""The command line's one-line errors: every error the user can cause is one ``error:`` line on
stderr and exit status 1; commands that write a directory treat SIGTERM like Ctrl-C."""

from __future__ import annotations

import functools
import os
import signal
import sys

import click

from ..utf8 import is_utf8


class CliError(click.ClickException):
    """A one-line error on stderr and exit status 1 (or ``exit_code``)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def one_line_usage(call, *args, **kwargs):
    """click's usage errors (unknown option, missing argument, a value of the wrong type) as one line."""
    try:
        return call(*args, **kwargs)
    except click.exceptions.NoArgsIsHelpError:
        raise
    except click.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        raise CliError(f"{e.format_message()}{hint}") from None


class OneLineGroup(click.Group):
    """A command group whose usage errors are one line."""

    def make_context(self, *args, **kwargs):
        return one_line_usage(super().make_context, *args, **kwargs)

    def invoke(self, ctx):
        return one_line_usage(super().invoke, ctx)


def flag_of(param: click.Parameter) -> str:
    """The option as the user may have typed it ("-o/--output"), or the argument's name."""
    return "/".join(param.opts) if isinstance(param, click.Option) else param.human_readable_name.rstrip(".")


def check_strings(ctx: click.Context) -> None:
    """Paths may not be empty; text (prompts, --system, --stop) must be UTF-8. Text from argv that
    is not UTF-8 reaches Python as lone surrogates, which no tokenizer takes."""
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        values = value if isinstance(value, (tuple, list)) else [value]
        for v in values:
            if not isinstance(v, str):
                continue
            if isinstance(param.type, click.Path) and not v.strip():
                raise CliError(f"{flag_of(param)} is an empty path")
            if isinstance(param.type, click.types.StringParamType) and not is_utf8(v):
                raise CliError(f"{flag_of(param)} is not valid UTF-8 text")


def errors_to_one_line(fn):
    """Turn the errors users cause (bad paths, options, models) into one line instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..export.errors import ExportError
        from ..quantize.errors import QuantizeError
        from ..runtime.config import ConfigError, GenerationConfig
        from ..runtime.errors import first_line

        try:
            check_strings(click.get_current_context())
            return fn(*args, **kwargs)
        except ConfigError as e:  # name the flag the user typed, not the Python field
            raise CliError(e.named(GenerationConfig.flag_of(e.field))) from None
        except KeyboardInterrupt:
            click.echo("", err=True)
            sys.exit(130)
        except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            sys.exit(128 + signal.SIGPIPE)
        except (ExportError, QuantizeError, ValueError, ImportError, OSError) as e:  # ManifestError etc. are ValueErrors
            raise CliError(first_line(e)) from None

    return wrapper


def writes_a_directory(fn):
    """For commands that write OUTPUT: SIGTERM unwinds like Ctrl-C (SIGINT), so the partial directory
    is removed; either ends with one line and exit status 128 + the signal's number. A signal that
    lands inside an import or a library can come out as another exception: having been signalled is
    what counts. A second signal ends the process at once (the next run removes what it left)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        received: list[int] = []

        def interrupt(signum, frame):
            received.append(signum)
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt()

        previous = {}
        for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            try:
                if signal.getsignal(sig) is default:  # not one the caller ignores (a background job's SIGINT)
                    previous[sig] = signal.signal(sig, interrupt)
            except ValueError:  # not the main thread: leave signals alone
                pass
        try:
            return fn(*args, **kwargs)
        except BaseException:
            if not received:
                raise
            name = signal.Signals(received[0]).name
            raise CliError(f"interrupted by {name}; nothing was written to {kwargs['output']}", 128 + received[0]) from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    return wrapper


def one_of(**flags: bool) -> str | None:
    """The one flag given among exclusive ones (``fp16=True, int8=False``), None for none."""
    given = [name for name, on in flags.items() if on]
    if len(given) > 1:
        raise CliError(" and ".join(f"--{name}" for name in given) + " exclude each other; choose one")
    return given[0] if given else None
