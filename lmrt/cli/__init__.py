"""The ``lmrt`` command line. Heavy imports (torch, transformers) happen only inside ``export``.

Every error the user can cause is one ``error:`` line on stderr and exit status 1, and every option
is checked before anything slow starts: click's own usage errors, values out of range (named by the
flag typed), text that is not UTF-8, empty paths. ``export`` and ``quantize`` treat SIGTERM like
Ctrl-C: what they were writing is removed and they exit with 128 + the signal's number.
"""

from __future__ import annotations

import click

from .. import __version__
from . import adapter, encoders, evaluate, export, generate, info, serve
from .errors import OneLineGroup


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lmrt")
def main() -> None:
    """lmrt: export language models to ONNX and run them without PyTorch."""


for command in (
    export.export, export.quantize, adapter.adapter, evaluate.eval_, generate.generate, generate.chat_, evaluate.bench, serve.serve,
    info.info, info.doctor, encoders.embed, encoders.classify,
):  # fmt: skip
    main.add_command(command)

__all__ = ["main"]
