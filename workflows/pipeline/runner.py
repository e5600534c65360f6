"""The whole run from one config: profile -> plan -> generate -> FID -> report.

Each stage is a function here (`profile_stage` ... `report_stage`) over the run's checked inputs
(`RunContext`). Its output is named by its key (`keys.py`: a hash of the stage's inputs), so a
stage whose output exists for the same inputs is skipped, a run that crashed resumes at the first
stage without output (generation itself resumes shard by shard), and a changed input re-runs only
the stages downstream of it, next to the old outputs.

Layout under `output` (a local path or any pyarrow.fs URI)::

    stages/profile-<key>.json   stages/plan-<key>.json   samples-<key>/ (shards, _manifest.json)
    stages/fid-<key>.json       reports/<key>/report.html, report.json, report-data.json
    stages/fid-paired-<key>.json (with report.fid_sequential: the plan's FID beside sequential's on the
                                 same ids, whose set is another samples-<key>/, or the plan's own if it
                                 is sequential)
    report.html, report.json    (copies of the latest report)
    run.json                    (what ran, what was skipped, every stage's key, output and workers)
    history.parquet/            (one file per run's report stage, its `run_id` the stage's key: the
                                 report's over-time figures)

The driver orchestrates: every stage's heavy work runs in Ray tasks or actors on the resources
its config section names (`workflows.runtime`). The driver reads the checkpoint once, for the
model's hash and shape; the workers load it from its reference (`ModelRef`).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable

import pyarrow.fs as pafs

from tarflow import Model, Plan, SamplingSpec, model_hash
from tarflow.profile import Profile
from tarflow.schema import SchemaError
from tarflow.schedule import hand_plan

from .. import runtime
from ..config import GenerateConfig, RunConfig
from ..fidelity.paired import FidDifference
from ..report import ModelResult, ReportData, report_files, where_plans_pay
from ..stages import compare, fid, generate, plan as planning, profile as profiling
from ..stages.fid import FIDResult
from ..storage import shards as sh
from ..storage.files import Store, resolve
from ..storage.history import HistoryRow, append_history, read_history
from . import keys

log = logging.getLogger(__name__)

STAGES = ("profile", "plan", "generate", "fid", "sequential", "fid-paired", "report")


class PipelineError(RuntimeError):
    """A stage failed; finished stages keep their outputs, so re-running resumes after them."""


@dataclass
class StageRecord:
    name: str
    key: str
    output: str
    skipped: bool
    seconds: float
    workers: list[dict] = field(default_factory=list)  # where its work ran (node, host, device); [] if skipped


@dataclass
class RunResult:
    """What a run produced: stage records, the plan, FID and the comparison the report shows."""

    config: RunConfig
    spec: SamplingSpec
    stages: list[StageRecord] = field(default_factory=list)
    plan: Plan | None = None
    plan_path: str = ""
    samples: str = ""
    fid: FIDResult | None = None
    fid_difference: FidDifference | None = None  # with report.fid_sequential
    model_result: ModelResult | None = None
    report: str = ""

    def to_dict(self) -> dict:
        return {"name": self.config.name, "config": self.config.model_dump(mode="json"), "spec": self.spec.to_dict(),
                "plan": self.plan_path, "samples": self.samples, "fid": self.fid.to_dict() if self.fid else {},
                "report": self.report, "stages": [asdict(s) for s in self.stages]}


class _Stopped(Exception):
    """The stage `stop_after` names has ended: the run ends with it."""


@dataclass
class RunContext:
    """One run's inputs, every one checked before any stage, and what its stages share: the store, the result
    so far and each finished stage's key."""

    cfg: RunConfig
    spec: SamplingSpec  # concrete for the model (`for_model`)
    model: Model  # for its hash and shape: nothing samples in the driver
    model_hash: str
    given_plan: Plan | None  # plan.path or plan.hand; None: the auto plan
    store: Store
    result: RunResult
    stop_after: str | None = None
    progress: bool | None = None
    keys: dict[str, str] = field(default_factory=dict)  # of the stages run or skipped so far

    @classmethod
    def open(cls, cfg: RunConfig, stop_after: str | None = None, progress: bool | None = None) -> "RunContext":
        """Check every input now: a bad one must not surface after hours of sampling."""
        if stop_after is not None and stop_after not in STAGES:
            raise ValueError(f"stop_after={stop_after!r}: allowed values are {', '.join(STAGES)}")
        model, provenance = cfg.model.load(with_metadata=True)
        spec = cfg.sampling.for_model(model.config.num_classes, provenance)
        mhash = model_hash(model)
        given_plan = None
        if cfg.plan.source == "path":
            given_plan = Plan.load(cfg.plan.path)
        elif cfg.plan.source == "hand":
            given_plan = hand_plan(cfg.plan.hand, model)
        if given_plan is not None:
            given_plan.check_model(len(model.blocks), model.num_tokens, mhash)
            given_plan.check_spec(spec)
        if cfg.fid.enabled:
            fid.check_reference(cfg.fid.reference, cfg.fid, model.config.img_size)
        _check_not_a_shard_set(cfg.output)
        runtime.check_reachable()
        store = Store(cfg.output)
        store.check_writable()
        stop_after = None if stop_after == STAGES[-1] else stop_after  # after the last stage: the whole run
        return cls(cfg, spec, model, mhash, given_plan, store, RunResult(cfg, spec), stop_after, progress)

    def stage(self, name: str, key: str, output: str, done: Callable[[], bool], work: Callable[[], list]) -> None:
        """Run `work` (returning where it ran) unless `done()` says the output for this key exists; record it
        in run.json; end the run here if `stop_after` names this stage."""
        start = time.perf_counter()
        skipped, workers = done(), []
        if skipped:
            log.info("[%s] skipped: %s exists for these inputs (key %s)", name, output, key)
        else:
            log.info("[%s] running (key %s)", name, key)
            try:
                workers = work()
            except Exception as e:
                _write_index(self.store, self.result)
                raise PipelineError(f"stage '{name}' failed: {type(e).__name__}: {e}. Finished stages are kept; "
                                    "re-run the same command to resume here.") from e
        self.keys[name] = key
        self.result.stages.append(StageRecord(name, key, output, skipped, time.perf_counter() - start, workers))
        _write_index(self.store, self.result)
        if self.stop_after == name:
            raise _Stopped

    def read(self, name: str, read: Callable[[str], object]):
        """`read(text)` of the stage output `name`; a damaged one is named, with what to do."""
        try:
            return read(self.store.read_text(name))
        except SchemaError as e:
            raise PipelineError(f"{self.store.path(name)} is damaged ({e}): delete it and re-run the same command "
                                "to make it again") from None


def run(cfg: RunConfig, stop_after: str | None = None, progress: bool | None = None) -> RunResult:
    """Run (or resume) every stage of `cfg`; `stop_after` ends early after that stage (for tests and
    debugging); `progress` as `workflows.progress.wants_bar` (None: a bar on a terminal, else log lines)."""
    ctx = RunContext.open(cfg, stop_after, progress)
    try:
        profile = profile_stage(ctx)
        plan = plan_stage(ctx, profile)
        generate_stage(ctx, plan)
        fid_stage(ctx)
        paired_fid_stage(ctx, plan)
        report_stage(ctx, plan, profile)
    except _Stopped:
        pass
    return ctx.result


def profile_stage(ctx: RunContext) -> Profile | None:
    """The model's profile under the spec, which only the auto plan needs (None for a given plan)."""
    if ctx.cfg.plan.source != "auto":
        return None
    cfg, store = ctx.cfg, ctx.store
    key = keys.profile(cfg, ctx.spec, ctx.model_hash)
    name = f"stages/profile-{key}.json"

    def work():
        prof, workers = profiling.profile(ctx.model, cfg.model, ctx.spec, cfg.calibration.data,
                                          cfg.calibration.num_images, cfg.resources.profile)
        store.write_text(name, prof.to_json())
        return workers

    ctx.stage("profile", key, store.path(name), lambda: store.exists(name), work)
    return ctx.read(name, Profile.from_json)


def plan_stage(ctx: RunContext, profile: Profile | None) -> Plan:
    """The given plan (checked against the model and spec when the run opened), or the auto plan scheduled from
    the profile, for that model and spec, in a generate worker."""
    cfg, store = ctx.cfg, ctx.store
    key = keys.plan(cfg, ctx.spec, ctx.model_hash, ctx.keys.get("profile"), ctx.given_plan)
    name = f"stages/plan-{key}.json"

    def work():
        workers = []
        if ctx.given_plan is not None:
            new = ctx.given_plan
        else:
            new, placement = planning.auto_plan(profile, cfg.model, cfg.plan.tol, cfg.resources.generate)
            workers = [placement]
        store.write_text(name, new.to_json())
        return workers

    ctx.stage("plan", key, store.path(name), lambda: store.exists(name), work)
    plan = ctx.result.plan = ctx.read(name, Plan.from_json)
    ctx.result.plan_path = store.path(name)
    return plan


def generate_stage(ctx: RunContext, plan: Plan, name: str = "generate") -> str:
    """The sample set of `plan`, into its own `samples-<key>/` (resumed shard by shard); returns where. The
    same ids under another plan are another set beside it (stage `sequential`), one plan's set only once."""
    cfg = ctx.cfg
    identity = generate.RunIdentity.of(ctx.model, ctx.model_hash, plan, ctx.spec, cfg.samples,
                                       cfg.resources.generate)
    key = keys.generate(cfg, identity)
    samples = ctx.store.path(f"samples-{key}")
    if name == "generate":  # the run's set, named in run.json also when the stage fails or the run stops after it
        ctx.result.samples = samples

    def complete() -> bool:
        try:
            return sh.read_manifest(samples).complete
        except (sh.ShardError, OSError):
            return False

    def work():
        summary = generate.generate(GenerateConfig(model=cfg.model, out=samples, samples=cfg.samples, spec=ctx.spec,
                                                   plan=plan, resources=cfg.resources.generate),
                                    progress=ctx.progress, identity=identity)
        log.info(summary.text())
        return summary.placements

    ctx.stage(name, key, samples, complete, work)
    return samples


def fid_stage(ctx: RunContext) -> None:
    """FID (with IS and KID) of the sample set against the reference, where FID is on."""
    cfg, store = ctx.cfg, ctx.store
    key = keys.fid(cfg, ctx.keys["generate"])
    if key is None:
        return
    name = f"stages/fid-{key}.json"

    def work():
        res = fid.evaluate_fid(ctx.result.samples, cfg.fid.reference, cfg.fid, cfg.resources.fid,
                               progress=ctx.progress)
        log.info(res.text())
        store.write_text(name, res.to_json())
        return res.placements

    ctx.stage("fid", key, store.path(name), lambda: store.exists(name), work)
    ctx.result.fid = ctx.read(name, FIDResult.from_json)


def paired_fid_stage(ctx: RunContext, plan: Plan) -> None:
    """With `report.fid_sequential`: the run's sample ids drawn sequentially (stage `sequential`), then both
    sets' FIDs with their uncertainties and the difference's (`stages.fid.compare_fid`, stage `fid-paired`)."""
    cfg, store = ctx.cfg, ctx.store
    if not cfg.report.fid_sequential:
        return
    sequential = generate_stage(ctx, Plan.sequential(plan.num_blocks, plan.num_tokens).bound_to(ctx.model_hash),
                                "sequential")
    key = keys.paired_fid(cfg, ctx.keys["generate"], ctx.keys["sequential"])
    name = f"stages/fid-paired-{key}.json"

    def work():
        found = fid.compare_fid(ctx.result.samples, sequential, cfg.fid.reference, cfg.fid, cfg.resources.fid,
                                progress=ctx.progress)
        log.info(found.text())
        store.write_text(name, found.to_json())
        return []

    ctx.stage("fid-paired", key, store.path(name), lambda: store.exists(name), work)
    ctx.result.fid_difference = ctx.read(name, FidDifference.from_json)


def report_stage(ctx: RunContext, plan: Plan, profile: Profile | None) -> None:
    """Sequential vs the plan on one batch in a generate worker, its row in the run's history, the report; the
    latest report copied to the output's top (also when the stage was skipped).

    The history row carries the stage's key as its `run_id`: a retry after a crash between the append and
    report.html finds it and appends none (its report shows the retry's own timings, the history the first's)."""
    cfg, store = ctx.cfg, ctx.store
    key = keys.report(cfg, ctx.keys["generate"], ctx.keys.get("fid"), ctx.keys.get("fid-paired"))
    folder, history = f"reports/{key}", store.path("history.parquet")

    def work():
        mr, placement = measure(ctx, plan, profile)
        rows = append_once(history, history_row(cfg.name, _comparison_label(cfg), plan, mr, placement, run_id=key))
        for name, text in report_files(report_data(ctx, mr, placement, rows)).items():
            store.write_text(f"{folder}/{name}", text)  # report.html last: it marks the stage done
        return [placement]

    ctx.stage("report", key, store.path(f"{folder}/report.html"), lambda: store.exists(f"{folder}/report.html"),
              work)
    for f in ("report.html", "report.json"):
        store.write_text(f, store.read_text(f"{folder}/{f}"))
    ctx.result.model_result = ctx.read(f"{folder}/report-data.json", ReportData.from_json).models[0]
    ctx.result.report = store.path("report.html")
    _write_index(store, ctx.result)


# ---- the report stage's parts ------------------------------------------------------------------------------------

def _comparison_label(cfg: RunConfig) -> str:
    return "auto plan" if cfg.plan.source == "auto" else f"{cfg.plan.source} plan"


def measure(ctx: RunContext, plan: Plan, profile: Profile | None) -> tuple[ModelResult, dict]:
    """Sequential vs the plan (and with `report.scaling_batch_sizes`, the auto plan per batch size) on the same
    noise in a generate worker, with the run's FID: (result, the task's placement)."""
    cfg = ctx.cfg
    label = _comparison_label(cfg)
    scaling = None
    if cfg.report.scaling_batch_sizes:
        scaling = compare.Scaling(tuple(cfg.report.scaling_batch_sizes), cfg.calibration.data, cfg.plan.tol,
                                  label if cfg.plan.source == "auto" else None)
    block_metrics = None if profile is None else [
        {"crm_share": b.crm_share, "igm_z": b.igm["z"], "igm_zeros": b.igm["zeros"]} for b in profile.blocks]
    mr, placement = compare.compare_in_worker(cfg.model, {label: plan}, ctx.spec, cfg.resources.generate, scaling,
                                              repeats=2, name=cfg.name, block_metrics=block_metrics)
    if ctx.result.fid is not None:
        mr.run(label).fid, mr.run(label).metrics = ctx.result.fid.fid, ctx.result.fid.values()
        mr.fid_extractor, mr.fid_num_samples = ctx.result.fid.extractor, ctx.result.fid.sample_count
    if ctx.result.fid_difference is not None:
        mr.runs[0].fid, mr.fid_difference = ctx.result.fid_difference.fid_sequential, ctx.result.fid_difference
    return mr, placement


def history_row(name: str, label: str, plan: Plan, mr: ModelResult, placement: dict, timestamp: str | None = None,
                others: dict | None = None, run_id: str = "") -> HistoryRow:
    """The history's row of model `name`: sequential vs the plan `label` as measured in `mr`, timed at
    `placement` (`compare.compare_in_worker`); `timestamp` (ISO 8601, UTC) default now."""
    seq, planned = mr.runs[0], mr.run(label)
    return HistoryRow(timestamp or datetime.now(timezone.utc).isoformat(timespec="seconds"), name, mr.model_hash,
                      label, plan.fingerprint(), mr.device, mr.batch_size, seq.seconds, planned.seconds,
                      planned.speedup, seq.passes, planned.passes, planned.max_abs_error, seq.fid, planned.fid,
                      mr.fid_extractor, mr.fid_num_samples, others or {}, accelerator=placement["accelerator"],
                      run_id=run_id, metrics=planned.metrics,
                      fid_sequential_se=mr.fid_difference and mr.fid_difference.sequential_se,
                      fid_difference_se=mr.fid_difference and mr.fid_difference.difference_se)


def append_once(history: str, row: HistoryRow) -> list[HistoryRow]:
    """Append `row` unless the history holds a row of its run already (a retried report stage); returns the
    history's rows after it, oldest first (one read of the store)."""
    rows = read_history(history)
    if any(r.run_id == row.run_id for r in rows):
        log.info("history %s holds run %s already: no second row", history, row.run_id)
        return rows
    append_history(history, [row])
    return sorted([*rows, row], key=lambda r: r.timestamp)  # as `read_history` orders them


def report_data(ctx: RunContext, mr: ModelResult, placement: dict, history: list[HistoryRow]) -> ReportData:
    """What the run's report shows: the measured model, the history, and what the run used where."""
    cfg, spec, result = ctx.cfg, ctx.spec, ctx.result
    notes = [f"config: {cfg.name} -> {cfg.output}", f"sampling: {spec.summary()}", f"plan: {result.plan_path}",
             f"samples: {result.samples}",
             f"timings: best of 2 on one batch of {spec.batch_size} in a generate worker "
             f"({placement['device']}, {placement['torch_threads']} torch threads, {placement['hostname']}), "
             "same noise for every sampler"]
    return ReportData(f"tarflow-gs run: {cfg.name}", [mr], history, notes)


def _check_not_a_shard_set(output: str) -> None:
    """A run's output is a folder of stages and sample sets: written into a shard set, run.json and stages/
    would sit among its shards, and Parquet readers of the set would choke on them."""
    fs, base = resolve(output)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return
    found = sorted({i.base_name for i in fs.get_file_info(pafs.FileSelector(base))}
                   & {sh.DATA_DIR, sh.MANIFEST_NAME, sh.RECORDS_DIR})
    if found:
        raise PipelineError(f"output {output} is a shard set (it holds {', '.join(found)}), as `tarflow-gs "
                            "generate` writes them: a run writes its own folder (stages, samples-<key>/, reports); "
                            "give it another output")


def _write_index(store: Store, result: RunResult) -> None:
    store.write_text("run.json", json.dumps(result.to_dict(), indent=2))


def summary_text(result: RunResult) -> str:
    """What `tarflow-gs run` and `jobs/fid_set.py` print at the end of a run."""
    lines = [f"{s.name:<9} {'skipped' if s.skipped else f'{s.seconds:.1f}s':>8}  {s.output}" for s in result.stages]
    if result.fid is not None:
        lines.append(result.fid.text())
    if result.fid_difference is not None:
        lines.append(result.fid_difference.text())
    if result.model_result is not None and len(result.model_result.runs) > 1:
        r, mr = result.model_result.runs[1], result.model_result
        same = " (the plan is sequential everywhere: timing noise)" if all(  # one token per pass: token steps
            b.segment_len == 1 for b in mr.blocks) and mr.blocks else ""
        lines.append(f"{r.plan}: {r.speedup:.2f}x vs sequential at batch {mr.batch_size}{same}, "
                     f"max |error| {r.max_abs_error:.1e}")
    headline = where_plans_pay(result.model_result) if result.model_result is not None else None
    if headline:  # the report's headline: the run's own batch size is not the only one that matters
        lines.append(headline)
    if result.report:
        lines.append(f"report: {result.report}")
    return "\n".join(lines)
