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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tarflow import Plan

from .. import runtime
from ..config import ConfigError, NightlyConfig, NightlyModel, ReportSection, RunConfig, Thresholds
from ..fidelity.registry import BETTER_HIGHER
from ..report import ModelResult, ReportData, report_files
from ..stages import compare
from ..storage.files import Store
from ..storage.history import HistoryRow, append_history, read_history
from .runner import history_row, run as run_pipeline

log = logging.getLogger(__name__)


def _measured_like(row: HistoryRow) -> tuple:
    return (row.model, row.model_hash, row.plan, row.accelerator, row.batch_size, row.fid_extractor,
            row.fid_num_samples)


def baseline(row: HistoryRow, history: list[HistoryRow]) -> HistoryRow | None:
    """The last passing row measured like `row`: the same model and checkpoint, timed on the same chip (GPU
    model, or CPU model and threads) at the same batch size, FID by the same extractor over as many samples.
    Rows measured otherwise say nothing about this one."""
    return next((r for r in reversed(history) if r.passed and _measured_like(r) == _measured_like(row)), None)


def check_regressions(row: HistoryRow, history: list[HistoryRow], t: Thresholds) -> list[str]:
    """Why `row` fails the gate against its baseline (empty: it passes, also when it has none)."""
    problems = []
    if not row.max_abs_error <= t.max_abs_error:  # also catches NaN
        problems.append(f"{row.model}: max |error| vs sequential {row.max_abs_error:.2e} > {t.max_abs_error:.0e}")
    if None not in (row.fid_plan, row.fid_sequential, row.fid_sequential_se):  # the same ids, this night
        allowed = t.fid_noise_sigmas * row.fid_sequential_se
        if not row.fid_plan - row.fid_sequential <= allowed:
            problems.append(f"{row.model}: FID {row.fid_plan:.3f} vs sequential's {row.fid_sequential:.3f} on the "
                            f"same ids: {row.fid_plan - row.fid_sequential:+.3f} > {allowed:.3f} "
                            f"({t.fid_noise_sigmas:g} standard errors of sequential's FID)")
    last = baseline(row, history)
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
    for name, allowed in t.max_metric_worsening.items():
        now, before = row.metrics.get(name), last.metrics.get(name)
        if before is None:
            continue
        if now is None:
            problems.append(f"{row.model}: no {name} this run, the last passing run had {before:.4g}")
            continue
        # worse by more than `allowed` of the last value, in the metric's own direction (KID can be below 0)
        worse = (before - now) if BETTER_HIGHER[name] else (now - before)
        if worse > allowed * abs(before):
            problems.append(f"{row.model}: {name} {now:.4g} vs {before:.4g} (last passing run {last.timestamp}, "
                            f"allowed worsening {allowed:.0%})")
    return problems


@dataclass
class NightlyResult:
    rows: list[HistoryRow]
    problems: list[str]
    report: str
    notes: list[str] = field(default_factory=list)  # what the gate could not judge, or that nothing was measured

    @property
    def passed(self) -> bool:
        return not self.problems


def _fid_of(cfg: RunConfig, label: str, plan: Plan, workdir: Path) -> float | None:
    """FID of the same N samples drawn with a hand plan: the pipeline with that plan given, into its own folder
    beside the auto plan's run."""
    slug = "".join(c if c.isalnum() else "-" for c in label)
    plan_file = plan.save(workdir / f"{cfg.name}-{slug}.json")
    other = cfg.model_copy(update={"name": f"{cfg.name}-{slug}", "output": f"{cfg.output}/{slug}",
                                   "plan": cfg.plan.model_copy(update={"path": str(plan_file), "hand": None}),
                                   "report": ReportSection()})  # only its FID is read: no scaling, no pairing
    return run_pipeline(other).fid.fid


def check_durable(cfg: NightlyConfig) -> None:
    """Refuse local history and output when joining a cluster: the job's driver runs on a pod that goes with
    the cluster, so every night would find no history and pass the gate with nothing to compare."""
    address = runtime.cluster_address()
    local = [f"{name} {value}" for name, value in (("history", cfg.history), ("output", cfg.output))
             if "://" not in value or value.startswith("file://")]
    if address and local:
        raise ConfigError(f"the nightly joins the Ray cluster at {address}, but its {' and '.join(local)} "
                          f"{'is a local path' if len(local) == 1 else 'are local paths'}: the driver's disk goes "
                          "with the cluster, so no night would find the ones before it. Give bucket URIs "
                          "(s3://..., gs://...): `output:` in the nightly config or --output (the history "
                          "defaults to <output>/history)")


def recorded_run(cfg: NightlyConfig, run_id: str, history: list[HistoryRow] | None = None) -> NightlyResult | None:
    """The result of run `run_id` if its rows are already in the history (this is a retry of it), else None."""
    rows = [r for r in (read_history(cfg.history) if history is None else history) if r.run_id == run_id]
    if not rows:
        return None
    problems = [f"{r.model}: run {run_id} recorded a regression (its report names it)" for r in rows if not r.passed]
    return NightlyResult(rows, problems, Store(f"{cfg.output.rstrip('/')}/{run_id}").path("report.html"),
                         notes=[f"run {run_id} is already in the history {cfg.history}: measured nothing again, "
                                "appended nothing"])


def _measure(entry: NightlyModel, night: Store, workdir: Path, now: datetime) -> tuple[HistoryRow, ModelResult]:
    """One model of the night: its pipeline run, the comparison with sequential and hand plans, their FIDs."""
    run_cfg = RunConfig.load(entry.config)
    if run_cfg.plan.source != "auto":
        raise ConfigError(f"{entry.config}: the nightly job measures the auto plan; remove plan.path / plan.hand "
                          "and list hand plans under hand_plans")
    update = {"output": night.path(run_cfg.name)}  # nothing cached across nights; a retry resumes its night
    if entry.num_samples is not None:
        update["samples"] = run_cfg.samples.model_copy(update={"num_samples": entry.num_samples})
    # the same ids drawn sequentially, in the run: its report shows both FIDs with the difference's uncertainty
    update["report"] = run_cfg.report.model_copy(update={"fid_sequential": entry.fid_sequential and
                                                         run_cfg.fid.enabled})
    run_cfg = run_cfg.model_copy(update=update)
    log.info("nightly: %s", run_cfg.name)
    result = run_pipeline(run_cfg)
    plans = {"auto plan": result.plan}
    num_blocks, num_tokens = result.plan.num_blocks, result.plan.num_tokens
    for notation in entry.hand_plans:
        plans[f"hand {notation}"] = Plan.from_paper_notation(notation, num_blocks, num_tokens).bound_to(
            result.plan.model_hash)
    mr, placement = compare.compare_in_worker(run_cfg.model, plans, result.spec, run_cfg.resources.generate,
                                          repeats=3, name=run_cfg.name,
                                          block_metrics=[{"crm_share": b.crm_share, "igm_z": b.igm_z,
                                                          "igm_zeros": b.igm_zeros}
                                                         for b in result.model_result.blocks])
    mr.scaling = result.model_result.scaling  # measured by the run's report stage, in a generate worker too
    seq, auto = mr.runs[0], mr.run("auto plan")
    if result.fid is not None:
        auto.fid, auto.metrics = result.fid.fid, result.fid.values()
        mr.fid_extractor, mr.fid_num_samples = result.fid.extractor, result.fid.sample_count
        if result.fid_difference is not None:
            seq.fid, mr.fid_difference = result.fid_difference.fid_sequential, result.fid_difference
        for r in mr.runs[2:]:
            r.fid = _fid_of(run_cfg, r.plan, plans[r.plan], workdir)
    others = {r.plan: {"speedup": r.speedup, "passes": r.passes, "max_abs_error": r.max_abs_error, "fid": r.fid}
              for r in mr.runs[2:]}
    return history_row(run_cfg.name, "auto plan", result.plan, mr, placement, now.isoformat(timespec="seconds"),
                       others), mr


def run_nightly(cfg: NightlyConfig, now: datetime | None = None, accept: bool = False, run_id: str | None = None,
                require_baseline: bool = False) -> NightlyResult:
    """Measure every model, append a row each to the history, write the report; returns the gate's verdict.
    A `run_id` whose rows the history holds already is not measured again (`recorded_run`)."""
    check_durable(cfg)
    now = now or datetime.now(timezone.utc)
    stamp = run_id or now.strftime("%Y%m%dT%H%M%SZ")
    done = recorded_run(cfg, stamp)
    if done is not None:
        return done
    night = Store(Store(cfg.output).path(stamp))
    rows, models = [], []
    # the hand plans' plan files; removed however the night ends
    with tempfile.TemporaryDirectory(prefix="tarflow-gs-nightly-") as workdir:
        for entry in cfg.models:
            row, measured = _measure(entry, night, Path(workdir), now)
            rows.append(row)
            models.append(measured)
    return record(cfg, stamp, rows, models, accept, require_baseline)


def gate(rows: list[HistoryRow], history: list[HistoryRow], thresholds: Thresholds, accept: bool = False,
         require_baseline: bool = False) -> tuple[list[str], list[str]]:
    """Judge each new row against the history before it (and earlier new rows); sets `row.passed`.
    Returns (problems, notes): a row with no baseline is a note, or with `require_baseline` a problem."""
    problems, notes = [], []
    for i, row in enumerate(rows):
        before = history + rows[:i]
        found = [] if accept else check_regressions(row, before, thresholds)
        if baseline(row, before) is None:
            missing = (f"{row.model}: no baseline: no earlier passing night of this model and checkpoint on "
                       f"{row.accelerator or 'an unnamed device'} at batch {row.batch_size} with FID "
                       f"{row.fid_extractor or 'off'} over {row.fid_num_samples} samples; nothing was compared")
            if require_baseline and not accept:
                found.append(f"{missing} (--require-baseline; record a first baseline with --accept)")
            else:
                notes.append(missing + (" (accepted as the baseline)" if accept else ""))
        row.passed = not found
        problems += found
    return problems, notes


def record(cfg: NightlyConfig, stamp: str, rows: list[HistoryRow], models: list, accept: bool = False,
           require_baseline: bool = False) -> NightlyResult:
    """Gate the night's rows, write the report, then append the rows (failing rows too, marked) to the
    history: appended last, they mark the run as recorded, so a retry after that appends none."""
    history = read_history(cfg.history)
    done = recorded_run(cfg, stamp, history)
    if done is not None:
        return done
    for row in rows:
        row.run_id = stamp
    problems, notes = gate(rows, history, cfg.thresholds, accept, require_baseline)
    header = [f"nightly run {stamp}; history {cfg.history}", "thresholds: " + json.dumps(cfg.thresholds.model_dump())]
    data = ReportData(f"tarflow-gs nightly {stamp}", models, history + rows,
                      header + notes + [f"REGRESSION: {p}" for p in problems])
    night = Store(Store(cfg.output).path(stamp))
    for name, text in report_files(data).items():
        night.write_text(name, text)
    append_history(cfg.history, rows)
    return NightlyResult(rows, problems, night.path("report.html"), notes)


def summary_text(result: NightlyResult) -> str:
    lines = [f"{r.model}: {r.speedup:.2f}x vs sequential, max |error| {r.max_abs_error:.1e}, "
             f"FID plan {r.fid_plan if r.fid_plan is None else round(r.fid_plan, 4)} / sequential "
             f"{r.fid_sequential if r.fid_sequential is None else round(r.fid_sequential, 4)}"
             + ("" if r.fid_difference_se is None or r.fid_plan is None else
                f" (difference {r.fid_plan - r.fid_sequential:+.4f} +- {r.fid_difference_se:.4f}, sequential's "
                f"noise +- {r.fid_sequential_se:.4f})")
             + f" -> {'ok' if r.passed else 'REGRESSION'}" for r in result.rows]
    lines += result.notes
    lines += [f"REGRESSION: {p}" for p in result.problems]
    lines.append(f"report: {result.report}")
    return "\n".join(lines)
