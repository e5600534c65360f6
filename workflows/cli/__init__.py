"""The `tarflow-gs` command line: argument parsing only; the work happens in workflows/ and tarflow/.

Every expected error (a missing or corrupt file, a bad field, a plan for another model, Ray
refusing) ends the command with its one-paragraph message on stderr and exit status 1; bad
option values exit 2 naming the option; SIGTERM stops a command as Ctrl-C does and exits 143
(`workflows.interrupt`). A traceback means a bug."""
from __future__ import annotations

import click

from .. import interrupt
from .errors import expected_errors


class _Group(click.Group):
    def invoke(self, ctx):
        interrupt.stop_on_sigterm()
        try:
            return super().invoke(ctx)
        except expected_errors() as e:
            raise click.ClickException(" ".join(str(e).split()) or type(e).__name__) from None
        except KeyboardInterrupt as e:
            # stop Ray now, deaf to a second Ctrl-C (one inside Ray's own atexit shutdown prints a traceback)
            from ..runtime import shutdown

            shutdown()
            if interrupt.by_sigterm(e):
                click.echo(f"{ctx.invoked_subcommand or 'tarflow-gs'}: stopped by SIGTERM; finished work is kept, the "
                           "same command resumes it", err=True)
                ctx.exit(interrupt.EXIT_STATUS)
            raise click.Abort() from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tarflow-gs")
def main():
    """Fast, exact TarFlow sampling with GS-Jacobi plans, locally or on a Ray cluster."""


def _register() -> None:
    # each area keeps its commands in its own module, so this file stays a table of contents
    from . import fid, generate, pipeline, planning, train_sample

    for module in (planning, generate, fid, pipeline, train_sample):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
