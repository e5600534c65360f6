"""The nightly speed/quality job: for each configured model, sequential vs the auto plan (and hand plans).

Per model it runs the whole pipeline fresh (profile -> auto plan -> N samples -> FID), times
sequential sampling and every plan on the same noise (wall time, speedup, passes, max error vs
sequential), generates the same N samples sequentially and with each hand plan for their FIDs,
and appends one row to the history table. The regression gate compares each row with the model's last *passing* row: a
regression stays flagged night after night until fixed, or until a run is accepted as the new
baseline (`accept=True`, e.g. after a deliberate hardware change).

Config (YAML)::

    history: runs/nightly/history.parquet
    output: runs/nightly              # each night writes <output>/<UTC stamp>/<model>/ and report.html
    thresholds:
      max_speedup_drop: 0.2           # fail when speedup < (1 - 0.2) x the last passing run's
      max_fid_rise: 0.1               # fail when the plan's FID > (1 + 0.1) x the last passing run's
      max_abs_error: 1.0e-3           # fail when the plan deviates from sequential by more
    models:
      - config: jobs/configs/demo.yaml   # a run config; its output is replaced by the night's folder
        hand_plans: [ ... ]              # optional paper-style plans, e.g. "7-8-32-10"
        fid_sequential: true             # also FID of N sequential samples (hand plans always get one)
"""
from __future__ import annotations

import copy
import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from tarflow import Plan

from .history import HistoryRow, append_history, read_history
from .report import ReportData, write_report
from .runconfig import ConfigError, RunConfig, _build, _number, _text

log = logging.getLogger(__name__)


@dataclass
class Thresholds:
    max_speedup_drop: float = 0.2
    max_fid_rise: float = 0.1
    max_abs_error: float = 1e-3

    def validate(self, where: str = "thresholds") -> "Thresholds":
        _number(self.max_speedup_drop, f"{where}.max_speedup_drop", 0.0)
        if self.max_speedup_drop >= 1:
            raise ConfigError(f"{where}.max_speedup_drop={self.max_speedup_drop}: a fraction in [0, 1)")
        _number(self.max_fid_rise, f"{where}.max_fid_rise", 0.0)
        _number(self.max_abs_error, f"{where}.max_abs_error", 0.0, strict=True)
        return self


@dataclass
class NightlyModel:
    config: str
    hand_plans: list[str] = field(default_factory=list)
    fid_sequential: bool = True


@dataclass
class NightlyConfig:
    history: str
    output: str
    models: list[NightlyModel]
    thresholds: Thresholds = field(default_factory=Thresholds)

    @classmethod
    def load(cls, path) -> "NightlyConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"nightly config not found: {path}")
        d = yaml.safe_load(path.read_text())
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: a nightly config must be a mapping")
        models = d.get("models")
        if not isinstance(models, list) or not models:
            raise ConfigError(f"{path}: models must be a non-empty list of {{config: PATH, hand_plans: [...]}}")
        cfg = _build(cls, {**d, "models": []}, "")
        cfg.models = [_build(NightlyModel, m, f"models[{i}].") for i, m in enumerate(models)]
        cfg.thresholds.validate()
        base = path.resolve().parent
        for i, m in enumerate(cfg.models):
            _text(m.config, f"models[{i}].config")
            found = next((root / m.config for root in (base, *base.parents) if (root / m.config).is_file()), None)
            if found is None:
                raise ConfigError(f"models[{i}].config={m.config!r}: no such run config beside {path} or above it")
            m.config = str(found)
            if not isinstance(m.hand_plans, list) or not all(isinstance(h, str) for h in m.hand_plans):
                raise ConfigError(f"models[{i}].hand_plans={m.hand_plans!r}: a list of plan strings such as '7-8-32-10'")
        for name in ("history", "output"):
            value = getattr(cfg, name)
            _text(value, name)
            if "://" not in value:
                setattr(cfg, name, str(Path(value).resolve()))
        return cfg


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
    from .pipeline import run as run_pipeline

    slug = "".join(c if c.isalnum() else "-" for c in label)
    plan_file = workdir / f"{cfg.name}-{slug}.json"
    plan.save(plan_file)
    other = copy.deepcopy(cfg)
    other.name, other.output = f"{cfg.name}-{slug}", f"{cfg.output}/{slug}"
    other.plan.path, other.plan.hand = str(plan_file), None
    return run_pipeline(other).fid.get("fid")


def run_nightly(cfg: NightlyConfig, now: datetime | None = None, accept: bool = False) -> NightlyResult:
    """Measure every model, append a row each to the history, write the report; returns the gate's verdict."""
    from . import schedule
    from .compare import compare_plans
    from .pipeline import Store, actor_threads, load_model, run as run_pipeline

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
        run_cfg.output = night.path(run_cfg.name)  # a fresh folder each night: nothing cached across nights
        log.info("nightly: %s", run_cfg.name)
        result = run_pipeline(run_cfg)
        model = load_model(run_cfg)
        plans = {"auto plan": result.plan}
        for hand in entry.hand_plans:
            plans[f"hand {hand}"] = schedule.hand_plan(hand, model)
        g = run_cfg.sampling.guidance
        mr = compare_plans(model, plans, num_images=run_cfg.sampling.batch_size, seed=run_cfg.sampling.seed,
                           labels=run_cfg.sampling.labels, repeats=3, name=run_cfg.name,
                           guidance={"guidance": g.scale, "attn_temp": g.attn_temp, "annealed_guidance": g.annealed,
                                     "guide_what": g.what},
                           block_metrics=[{"crm_share": b.crm_share, "igm_z": b.igm_z, "igm_zeros": b.igm_zeros}
                                          for b in result.model_result.blocks], threads=actor_threads(run_cfg))
        seq, auto = mr.runs[0], mr.run("auto plan")
        auto.fid = result.fid.get("fid")
        mr.fid_extractor, mr.fid_num_samples = result.fid.get("extractor", ""), result.fid.get("sample_count", 0)
        if run_cfg.fid.enabled:
            if entry.fid_sequential:
                seq.fid = _fid_of(run_cfg, "sequential", Plan.sequential(len(model.blocks), model.num_tokens),
                                  workdir)
            for r in mr.runs[2:]:
                r.fid = _fid_of(run_cfg, r.plan, plans[r.plan], workdir)
        others = {r.plan: {"speedup": r.speedup, "passes": r.passes, "max_abs_error": r.max_abs_error, "fid": r.fid}
                  for r in mr.runs[2:]}
        row = HistoryRow(now.isoformat(timespec="seconds"), run_cfg.name, mr.model_hash, "auto plan",
                         result.plan.fingerprint(), mr.device, run_cfg.sampling.batch_size, seq.seconds, auto.seconds,
                         auto.speedup, seq.passes, auto.passes, auto.max_abs_error, seq.fid, auto.fid,
                         mr.fid_extractor, mr.fid_num_samples, others)
        rows.append(row)
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
    from .pipeline import Store

    problems = gate(rows, read_history(cfg.history), cfg.thresholds, accept)
    append_history(cfg.history, rows)
    notes = [f"nightly run {stamp}; history {cfg.history}",
             "thresholds: " + json.dumps(asdict(cfg.thresholds)),
             *(f"REGRESSION: {p}" for p in problems)]
    data = ReportData(f"tarflow-gs nightly {stamp}", models, [r.point() for r in read_history(cfg.history)], notes)
    local = Path(tempfile.mkdtemp(prefix="tarflow-gs-nightly-report-"))
    write_report(data, local)
    night = Store(f"{cfg.output.rstrip('/')}/{stamp}")
    for name in ("report-data.json", "report.json", "report.html"):
        night.write_text(name, (local / name).read_text())
    return NightlyResult(rows, problems, night.path("report.html"))


def summary_text(result: NightlyResult) -> str:
    lines = [f"{r.model}: {r.speedup:.2f}x vs sequential, max |error| {r.max_abs_error:.1e}, "
             f"FID plan {r.fid_plan if r.fid_plan is None else round(r.fid_plan, 4)} / sequential "
             f"{r.fid_sequential if r.fid_sequential is None else round(r.fid_sequential, 4)}"
             f" -> {'ok' if r.passed else 'REGRESSION'}" for r in result.rows]
    lines += [f"REGRESSION: {p}" for p in result.problems]
    lines.append(f"report: {result.report}")
    return "\n".join(lines)

