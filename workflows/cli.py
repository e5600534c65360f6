"""The `tarflow-gs` command line: argument parsing only; the work happens in workflows/ and tarflow/."""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Fast, exact TarFlow sampling with GS-Jacobi plans, locally or on a Ray cluster."""


def _register() -> None:
    # Each area keeps its commands in its own module so the CLI stays a table of contents.
    from . import commands

    for command in commands.ALL:
        main.add_command(command)


_register()
