"""`tarflow-gs run CONFIG` (the whole pipeline) and `tarflow-gs report` (render a report from results)."""
from __future__ import annotations

import logging

import click


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


@click.command("run")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--stop-after", type=click.Choice(["profile", "plan", "generate", "fid", "report"]), default=None,
              help="End after this stage (the next run resumes there).")
def run_command(config, stop_after):
    """Run CONFIG (YAML) end to end: profile -> plan -> generate -> FID -> report.

    Stages whose output exists for the same inputs are skipped, so re-running resumes.
    Without RAY_ADDRESS a local Ray sized to this machine starts; with it, the run joins that cluster."""
    from workflows.pipeline import PipelineError, run
    from workflows.runconfig import ConfigError, RunConfig

    _setup_logging()
    try:
        result = run(RunConfig.load(config), stop_after=stop_after)
    except (ConfigError, FileNotFoundError, PipelineError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(summary_text(result))


def summary_text(result) -> str:
    lines = [f"{s.name:<9} {'skipped' if s.skipped else f'{s.seconds:.1f}s':>8}  {s.output}" for s in result.stages]
    if result.fid:
        lines.append(f"FID: {result.fid['fid']:.4f} ({result.fid['sample_count']} samples vs "
                     f"{result.fid['reference_count']} reference images, extractor {result.fid['extractor']})")
    if result.model_result is not None and len(result.model_result.runs) > 1:
        r, mr = result.model_result.runs[1], result.model_result
        same = " (the plan is sequential everywhere: timing noise)" if all(
            b.solver == "sequential" for b in mr.blocks) and mr.blocks else ""
        lines.append(f"{r.plan}: {r.speedup:.2f}x vs sequential at batch {mr.batch_size}{same}, "
                     f"max |error| {r.max_abs_error:.1e}")
    if result.report:
        lines.append(f"report: {result.report}")
    return "\n".join(lines)


@click.command("report")
@click.option("--data", "data_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="report-data.json written by `tarflow-gs run` or the nightly job (repeat to combine models).")
@click.option("--history", default=None, help="History Parquet table (nightly or a run's history.parquet).")
@click.option("--title", default="tarflow-gs report", show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for report.html / report.json.")
def report_command(data_files, history, title, out):
    """Render a self-contained HTML report (and its figures as JSON) from run results and a history table."""
    from pathlib import Path

    from workflows.history import read_history
    from workflows.report import ReportData, write_report

    if not data_files and not history:
        raise click.UsageError("give at least one --data file or a --history table")
    data = ReportData(title)
    for f in data_files:
        part = ReportData.from_json(Path(f).read_text())
        data.models += part.models
        data.history += part.history
        data.notes += part.notes
    if history:
        data.history = [r.point() for r in read_history(history)]
    html_path, json_path = write_report(data, out)
    click.echo(f"report: {html_path}\nfigures: {json_path}")


ALL = [run_command, report_command]
