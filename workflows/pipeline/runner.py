"""The whole run from one config: profile -> plan -> generate -> FID -> report.

Each stage's output is named by a hash of that stage's inputs (the config sections it reads,
the sampling spec's JSON and the keys of the stages before it), so a stage whose output exists
for the same inputs is skipped, a run that crashed resumes at the first stage without output
(generation itself resumes shard by shard), and a changed input re-runs only the stages
downstream of it, next to the old outputs.

Layout under `output` (a local path or any pyarrow.fs URI)::

    stages/profile-<key>.json   stages/plan-<key>.json   samples-<key>/ (shards, _manifest.json)
    stages/fid-<key>.json       reports/<key>/report.html, report.json, report-data.json
    report.html, report.json    (copies of the latest report)
    run.json                    (what ran, what was skipped, every stage's key, output and workers)
    history.parquet/            (one file per completed run: the report's over-time figures)

The driver orchestrates: every stage's heavy work runs in Ray tasks or actors on the resources
its config section names (`workflows.runtime`); the driver loads the model only for its hash.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import pyarrow.fs as pafs

from tarflow import Plan, SamplingSpec, model_hash
from tarflow.profile import Profile
from tarflow.schedule import hand_plan

from ..config import GenerateConfig, RunConfig
from ..report import ModelResult, ReportData, report_files
from ..runtime import worker_threads as runtime_threads
from ..stages import compare, fid, generate, plan as plan_stage, profile as profile_stage
from ..storage import shards as sh
from ..storage.files import Store, resolve
from ..storage.history import HistoryRow, append_history, read_history

log = logging.getLogger(__name__)

STAGES = ("profile", "plan", "generate", "fid", "report")


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
    fid: dict = field(default_factory=dict)
    model_result: ModelResult | None = None
    report: str = ""

    def to_dict(self) -> dict:
        return {"name": self.config.name, "config": self.config.model_dump(mode="json"), "spec": self.spec.to_dict(),
                "plan": self.plan_path, "samples": self.samples, "fid": self.fid, "report": self.report,
                "stages": [asdict(s) for s in self.stages]}


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _comparison_label(cfg: RunConfig) -> str:
    return "auto plan" if cfg.plan.source == "auto" else f"{cfg.plan.source} plan"


def _block_metrics(profile: Profile | None) -> list[dict] | None:
    if profile is None:
        return None
    return [{"crm_share": b.crm_share, "igm_z": b.igm["z"], "igm_zeros": b.igm["zeros"]} for b in profile.blocks]


def _report(cfg: RunConfig, spec: SamplingSpec, plan: Plan, fid_result: dict, profile: Profile | None,
            result: RunResult, history_uri: str) -> tuple[ReportData, dict]:
    label = _comparison_label(cfg)
    scaling = None
    if cfg.report.scaling_batch_sizes:
        scaling = compare.Scaling(tuple(cfg.report.scaling_batch_sizes), cfg.calibration.data, cfg.plan.tol,
                                  label if cfg.plan.source == "auto" else None)
    mr, where = compare.compare_in_worker(cfg.model, {label: plan}, spec, cfg.resources.generate, scaling, repeats=2,
                                          name=cfg.name, block_metrics=_block_metrics(profile))
    if fid_result:
        mr.run(label).fid = fid_result.get("fid")
        mr.fid_extractor, mr.fid_num_samples = fid_result["extractor"], fid_result["sample_count"]
    seq, planned = mr.runs[0], mr.runs[1]
    row = HistoryRow(datetime.now(timezone.utc).isoformat(timespec="seconds"), cfg.name, mr.model_hash, label,
                     plan.fingerprint(), mr.device, spec.batch_size, seq.seconds, planned.seconds,
                     planned.speedup, seq.passes, planned.passes, planned.max_abs_error, None, planned.fid,
                     mr.fid_extractor, mr.fid_num_samples, accelerator=where["accelerator"])
    append_history(history_uri, [row])
    notes = [f"config: {cfg.name} -> {cfg.output}", f"sampling: {spec.summary()}", f"plan: {result.plan_path}",
             f"samples: {result.samples}",
             f"timings: best of 2 on one batch of {spec.batch_size} in a generate worker "
             f"({where['device']}, {where['torch_threads']} torch threads, {where['hostname']}), "
             "same noise for every sampler"]
    return ReportData(f"tarflow-gs run: {cfg.name}", [mr], read_history(history_uri), notes), where


def run(cfg: RunConfig, stop_after: str | None = None, progress: bool | None = None) -> RunResult:
    """Run (or resume) every stage of `cfg`; `stop_after` ends early after that stage (for tests and
    debugging); `progress` as `workflows.progress.wants_bar` (None: a bar on a terminal, else log lines)."""
    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"stop_after={stop_after!r}: allowed values are {', '.join(STAGES)}")
    # every input is checked here, before any stage: a bad one must not surface after hours of sampling
    model, provenance = cfg.model.load(with_metadata=True)  # for its hash and shape: nothing samples here
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
    store = Store(cfg.output)
    store.check_writable()
    result = RunResult(cfg, spec)

    def stage(name: str, key: str, output: str, done, work) -> bool:
        """Run `work` (returning where it ran) unless `done()` says the output for this key exists."""
        start = time.perf_counter()
        skipped, workers = done(), []
        if skipped:
            log.info("[%s] skipped: %s exists for these inputs (key %s)", name, output, key)
        else:
            log.info("[%s] running (key %s)", name, key)
            try:
                workers = work()
            except Exception as e:
                _write_index(store, result)
                raise PipelineError(f"stage '{name}' failed: {type(e).__name__}: {e}. Finished stages are kept; "
                                    "re-run the same command to resume here.") from e
        result.stages.append(StageRecord(name, key, output, skipped, time.perf_counter() - start, workers))
        _write_index(store, result)
        return stop_after == name

    # profile: only the auto plan needs one
    profile = None
    profile_key = _hash("profile", mhash, cfg.calibration.model_dump(), spec.to_dict(),
                        cfg.resources.profile.model_dump())
    profile_name = f"stages/profile-{profile_key}.json"
    if cfg.plan.source == "auto":
        def make_profile():
            prof, workers = profile_stage.profile(model, cfg.model, spec, cfg.calibration.data,
                                                  cfg.calibration.num_images, cfg.resources.profile)
            store.write_text(profile_name, prof.to_json())
            return workers

        if stage("profile", profile_key, store.path(profile_name), lambda: store.exists(profile_name), make_profile):
            return result
        profile = Profile.from_json(store.read_text(profile_name))

    plan_key = _hash("plan", mhash, cfg.plan.model_dump(), spec.to_dict(), cfg.resources.generate.model_dump(),
                     profile_key if profile else None, given_plan.to_dict() if given_plan else None)
    plan_name = f"stages/plan-{plan_key}.json"

    def make_plan():
        workers = []
        if given_plan is not None:
            new = given_plan
        else:
            new, where = plan_stage.auto_plan(profile, cfg.model, cfg.plan.tol, cfg.resources.generate)
            workers = [where]
        new.check_model(len(model.blocks), model.num_tokens, mhash)
        new.check_spec(spec)
        store.write_text(plan_name, new.to_json())
        return workers

    if stage("plan", plan_key, store.path(plan_name), lambda: store.exists(plan_name), make_plan):
        return result
    plan = result.plan = Plan.from_json(store.read_text(plan_name))
    result.plan_path = store.path(plan_name)

    gen_key = _hash("generate", mhash, plan.fingerprint(), spec.to_dict(), cfg.samples.model_dump(),
                    cfg.resources.generate.num_gpus > 0, runtime_threads(cfg.resources.generate))
    samples = result.samples = store.path(f"samples-{gen_key}")

    def samples_complete() -> bool:
        try:
            return sh.read_manifest(samples).complete
        except (sh.ShardError, OSError):
            return False

    def make_samples():
        summary = generate.generate(GenerateConfig(model=cfg.model, out=samples, samples=cfg.samples, spec=spec,
                                                   plan=plan, resources=cfg.resources.generate), progress=progress)
        log.info(summary.text())
        return summary.placements

    if stage("generate", gen_key, samples, samples_complete, make_samples):
        return result

    fid_key = _hash("fid", gen_key, cfg.fid.model_dump())
    fid_name = f"stages/fid-{fid_key}.json"
    if cfg.fid.enabled:
        def make_fid():
            res = fid.evaluate_fid(samples, cfg.fid.reference, cfg.fid, cfg.resources.fid, progress=progress)
            log.info(res.text())
            store.write_text(fid_name, res.to_json())
            return res.placements

        if stage("fid", fid_key, store.path(fid_name), lambda: store.exists(fid_name), make_fid):
            return result
        result.fid = json.loads(store.read_text(fid_name))

    report_key = _hash("report", gen_key, fid_key if cfg.fid.enabled else None, cfg.name, cfg.report.model_dump())
    report_dir = f"reports/{report_key}"

    def make_report():
        data, where = _report(cfg, spec, plan, result.fid, profile, result, store.path("history.parquet"))
        for name, text in report_files(data).items():  # report.html last: it marks the stage done
            store.write_text(f"{report_dir}/{name}", text)
        return [where]

    stage("report", report_key, store.path(f"{report_dir}/report.html"),
          lambda: store.exists(f"{report_dir}/report.html"), make_report)
    for f in ("report.html", "report.json"):  # the latest report at a fixed place, also when the stage was skipped
        store.write_text(f, store.read_text(f"{report_dir}/{f}"))
    result.model_result = ReportData.from_json(store.read_text(f"{report_dir}/report-data.json")).models[0]
    result.report = store.path("report.html")
    _write_index(store, result)
    return result


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
    if result.fid:
        f, count = result.fid, result.fid.get("reference_count")
        lines.append(f"FID: {f['fid']:.4f} ({f['sample_count']} samples vs {'?' if count is None else count} "
                     f"reference images, extractor {f['extractor']})")
        if f.get("inception_score") is not None:
            lines.append(f"IS: {f['inception_score']:.4f} (all samples, one split)")
        if f.get("kid"):
            lines.append(f"KID: {f['kid']['kid_mean']:.6f} +- {f['kid']['kid_std']:.6f} (strided subset)")
    if result.model_result is not None and len(result.model_result.runs) > 1:
        r, mr = result.model_result.runs[1], result.model_result
        same = " (the plan is sequential everywhere: timing noise)" if all(
            b.solver == "sequential" for b in mr.blocks) and mr.blocks else ""
        lines.append(f"{r.plan}: {r.speedup:.2f}x vs sequential at batch {mr.batch_size}{same}, "
                     f"max |error| {r.max_abs_error:.1e}")
    if result.report:
        lines.append(f"report: {result.report}")
    return "\n".join(lines)
