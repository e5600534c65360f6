"""`tarflow-gs run CONFIG` (the whole pipeline) and `tarflow-gs report` (render a report from results)."""
from __future__ import annotations

import logging
import re

import click

from .options import progress_option


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


@click.command("run")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--output", default=None, help="Override the config's output (a local path or URI).")
@click.option("--stop-after", type=click.Choice(["profile", "plan", "generate", "fid", "report"]), default=None,
              help="End after this stage (the next run resumes there).")
@progress_option
def run_command(config, output, stop_after, progress):
    """Run CONFIG (YAML) end to end: profile -> plan -> generate -> FID -> report.

    Stages whose output exists for the same inputs are skipped, so re-running resumes. With
    RAY_ADDRESS set to a cluster (as inside `ray job submit`) the run joins it; without, a
    private local Ray starts."""
    from ..config import RunConfig
    from ..pipeline import run, summary_text

    _setup_logging()
    cfg = RunConfig.load(config)
    if output:
        cfg = cfg.model_copy(update={"output": output})
    click.echo(summary_text(run(cfg, stop_after=stop_after, progress=progress)))


@click.command("report")
@click.option("--data", "data_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="report-data.json written by `tarflow-gs run` or the nightly job (repeat to combine models).")
@click.option("--history", default=None, help="History table (a run's or the nightly history.parquet folder).")
@click.option("--title", default="tarflow-gs report", show_default=True, help="The page's title.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for report.html / report.json.")
def report_command(data_files, history, title, out):
    """Render a self-contained HTML report (and its figures as JSON) from run results and a history table."""
    from ..report import ReportData, write_report
    from ..storage.history import read_history

    if not data_files and not history:
        raise click.UsageError("give at least one --data file or a --history table")
    data = ReportData(title)
    for f in data_files:
        part = ReportData.load(f)
        data.models += part.models
        data.history += part.history
        data.notes += part.notes
    if history:
        data.history = read_history(history)
    html_path, json_path = write_report(data, out)
    click.echo(f"report: {html_path}\nfigures: {json_path} (their data), {out}/figures/ (PNG)")


def _check_run_id(value: str | None) -> str | None:
    # it names a folder and a Kubernetes object: letters, digits, '.', '_', '-'
    if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", value):
        raise click.BadParameter(f"{value!r}: letters, digits, '.', '_' and '-', starting with a letter or digit")
    return value


@click.command("nightly")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--output", default=None,
              help="Override the config's output (a local path or URI); a history the config leaves unset is "
                   "<output>/history.")
@click.option("--run-id", callback=lambda ctx, param, value: _check_run_id(value), default=None,
              help="This run's id, naming its folder under the output (default: the UTC start stamp). A retry "
                   "given the same id resumes the run and, once its rows are in the history, appends none.")
@click.option("--accept", is_flag=True,
              help="Record this night as the new baseline instead of gating it (after a deliberate change).")
@click.option("--require-baseline", is_flag=True,
              help="Fail a model that has no earlier passing night measured like it (same checkpoint, chip, batch "
                   "size, FID settings) instead of passing it with a note.")
def nightly_command(config, output, run_id, accept, require_baseline):
    """Measure every model of the nightly CONFIG, append to the history, write the report.

    Exits 1 when a model's speed, FID or exactness regressed against its last passing night (or, with
    --require-baseline, has none)."""
    from ..config import NightlyConfig
    from ..pipeline.nightly import run_nightly, summary_text

    _setup_logging()
    result = run_nightly(NightlyConfig.load(config, output=output), accept=accept, run_id=run_id,
                         require_baseline=require_baseline)
    click.echo(summary_text(result))
    if not result.passed:
        raise SystemExit(1)


COMMANDS = [run_command, report_command, nightly_command]
