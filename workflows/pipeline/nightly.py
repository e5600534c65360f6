"""The nightly speed/quality job: for each configured model, sequential vs the auto plan (and hand plans).

Per model it runs the whole pipeline fresh (profile -> auto plan -> N samples -> FID), times
sequential sampling and every plan on the same noise in a generate worker (wall time, speedup,
passes, max error vs sequential), generates the same N samples sequentially and with each hand
plan for their FIDs, and appends one row to the history table. The regression gate compares
each row with the model's last *passing* row: a regression stays flagged night after night
until fixed, or until a run is accepted as the new baseline (`accept=True`, e.g. after a
deliberate hardware change). The config: `workflows/config/nightly.py`.
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tarflow import Plan

from ..config import ConfigError, NightlyConfig, ReportSection, RunConfig, Thresholds
from ..report import ReportData, report_files
from ..stages import compare
from ..storage.files import Store
from ..storage.history import HistoryRow, append_history, read_history
from .runner import run as run_pipeline

log = logging.getLogger(__name__)


def check_regressions(row: HistoryRow, history: list[HistoryRow], t: Thresholds) -> list[str]:
    """Why `row` fails the gate against the model's last passing row (empty: it passes)."""
    problems = []
    if not row.max_abs_error <= t.max_abs_error:  # also catches NaN
        problems.append(f"{row.model}: max |error| vs sequential {row.max_abs_error:.2e} > {t.max_abs_error:.0e}")
    last = next((r for r in reversed(history) if r.model == row.model and r.passed), None)
    if last is None:
        return problems
    floor = last.speedup * (1 - t.max_speedup_drop)
    if not row.speedup >= floor:
        problems.append(f"{row.model}: speedup {row.speedup:.2f}x < {floor:.2f}x "
                        f"(last passing run {last.timestamp}: {last.speedup:.2f}x, allowed drop {t.max_speedup_drop:.0%})")
    if row.fid_plan is not None and last.fid_plan is not None:
        ceiling = last.fid_plan * (1 + t.max_fid_rise)
        if not row.fid_plan <= ceiling:
            problems.append(f"{row.model}: FID {row.fid_plan:.3f} > {ceiling:.3f} "
                            f"(last passing run {last.timestamp}: {last.fid_plan:.3f}, allowed rise {t.max_fid_rise:.0%})")
    elif last.fid_plan is not None:
        problems.append(f"{row.model}: no FID this run, the last passing run had {last.fid_plan:.3f}")
    return problems


@dataclass
class NightlyResult:
    rows: list[HistoryRow]
    problems: list[str]
    report: str

    @property
    def passed(self) -> bool:
        return not self.problems


def _fid_of(cfg: RunConfig, label: str, plan: Plan, workdir: Path) -> float | None:
    """FID of the same N samples drawn with another plan (sequential, a hand plan): the pipeline with
    that plan given, into its own folder beside the auto plan's run."""
    slug = "".join(c if c.isalnum() else "-" for c in label)
    plan_file = plan.save(workdir / f"{cfg.name}-{slug}.json")
    other = cfg.model_copy(update={"name": f"{cfg.name}-{slug}", "output": f"{cfg.output}/{slug}",
                                   "plan": cfg.plan.model_copy(update={"path": str(plan_file), "hand": None}),
                                   "report": ReportSection()})  # only its FID is read: no scaling profiles
    return run_pipeline(other).fid.get("fid")


def run_nightly(cfg: NightlyConfig, now: datetime | None = None, accept: bool = False) -> NightlyResult:
    """Measure every model, append a row each to the history, write the report; returns the gate's verdict."""
    now = now or datetime.now(timezone.utc)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    night = Store(f"{cfg.output.rstrip('/')}/{stamp}")
    workdir = Path(tempfile.mkdtemp(prefix="tarflow-gs-nightly-"))
    rows, models = [], []
    for entry in cfg.models:
        run_cfg = RunConfig.load(entry.config)
        if run_cfg.plan.source != "auto":
            raise ConfigError(f"{entry.config}: the nightly job measures the auto plan; remove plan.path / plan.hand "
                              "and list hand plans under hand_plans")
        run_cfg = run_cfg.model_copy(update={"output": night.path(run_cfg.name)})  # nothing cached across nights
        log.info("nightly: %s", run_cfg.name)
        result = run_pipeline(run_cfg)
        plans = {"auto plan": result.plan}
        num_blocks, num_tokens = result.plan.num_blocks, result.plan.num_tokens
        for notation in entry.hand_plans:
            plans[f"hand {notation}"] = Plan.from_paper_notation(notation, num_blocks, num_tokens).bound_to(
                result.plan.model_hash)
        mr, _ = compare.compare_in_worker(run_cfg.model, plans, result.spec, run_cfg.resources.generate, repeats=3,
                                          name=run_cfg.name,
                                          block_metrics=[{"crm_share": b.crm_share, "igm_z": b.igm_z,
                                                          "igm_zeros": b.igm_zeros}
                                                         for b in result.model_result.blocks])
        mr.scaling = result.model_result.scaling  # measured by the run's report stage, in a generate worker too
        seq, auto = mr.runs[0], mr.run("auto plan")
        auto.fid = result.fid.get("fid")
        mr.fid_extractor, mr.fid_num_samples = result.fid.get("extractor", ""), result.fid.get("sample_count", 0)
        if run_cfg.fid.enabled:
            if entry.fid_sequential:
                seq.fid = _fid_of(run_cfg, "sequential", Plan.sequential(num_blocks, num_tokens), workdir)
            for r in mr.runs[2:]:
                r.fid = _fid_of(run_cfg, r.plan, plans[r.plan], workdir)
        others = {r.plan: {"speedup": r.speedup, "passes": r.passes, "max_abs_error": r.max_abs_error, "fid": r.fid}
                  for r in mr.runs[2:]}
        rows.append(HistoryRow(now.isoformat(timespec="seconds"), run_cfg.name, mr.model_hash, "auto plan",
                               result.plan.fingerprint(), mr.device, result.spec.batch_size, seq.seconds,
                               auto.seconds, auto.speedup, seq.passes, auto.passes, auto.max_abs_error, seq.fid,
                               auto.fid, mr.fid_extractor, mr.fid_num_samples, others))
        models.append(mr)
    return record(cfg, stamp, rows, models, accept)


def gate(rows: list[HistoryRow], history: list[HistoryRow], thresholds: Thresholds, accept: bool = False) -> list[str]:
    """Judge each new row against the history before it (and earlier new rows); sets `row.passed`."""
    problems = []
    for i, row in enumerate(rows):
        found = [] if accept else check_regressions(row, history + rows[:i], thresholds)
        row.passed = not found
        problems += found
    return problems


def record(cfg: NightlyConfig, stamp: str, rows: list[HistoryRow], models: list, accept: bool = False) -> NightlyResult:
    """Gate the night's rows, append them (failing rows too, marked) to the history, write the report."""
    problems = gate(rows, read_history(cfg.history), cfg.thresholds, accept)
    append_history(cfg.history, rows)
    notes = [f"nightly run {stamp}; history {cfg.history}",
             "thresholds: " + json.dumps(cfg.thresholds.model_dump()),
             *(f"REGRESSION: {p}" for p in problems)]
    data = ReportData(f"tarflow-gs nightly {stamp}", models, read_history(cfg.history), notes)
    night = Store(f"{cfg.output.rstrip('/')}/{stamp}")
    for name, text in report_files(data).items():
        night.write_text(name, text)
    return NightlyResult(rows, problems, night.path("report.html"))


def summary_text(result: NightlyResult) -> str:
    lines = [f"{r.model}: {r.speedup:.2f}x vs sequential, max |error| {r.max_abs_error:.1e}, "
             f"FID plan {r.fid_plan if r.fid_plan is None else round(r.fid_plan, 4)} / sequential "
             f"{r.fid_sequential if r.fid_sequential is None else round(r.fid_sequential, 4)}"
             f" -> {'ok' if r.passed else 'REGRESSION'}" for r in result.rows]
    lines += [f"REGRESSION: {p}" for p in result.problems]
    lines.append(f"report: {result.report}")
    return "\n".join(lines)
