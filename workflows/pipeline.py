"""The whole run from one config: profile -> plan -> generate -> FID -> report.

Each stage's output is named by a hash of that stage's inputs (the config sections it reads and
the keys of the stages before it), so a stage whose output exists for the same inputs is skipped,
a run that crashed resumes at the first stage without output (generation itself resumes shard by
shard), and a changed input re-runs only the stages downstream of it, next to the old outputs.

Layout under `output` (a local path or any pyarrow.fs URI)::

    stages/profile-<key>.json   stages/plan-<key>.json   samples-<key>/ (shards, _manifest.json)
    stages/fid-<key>.json       reports/<key>/report.html, report.json, report-data.json
    report.html, report.json    (copies of the latest report)
    run.json                    (what ran, what was skipped, every stage's key and output)
    history.parquet             (one row per completed run, the report's over-time figures)

Ray: with no RAY_ADDRESS a private local Ray sized to this machine starts; with one (as inside
`ray job submit`) the run joins that cluster.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.fs as pafs

from tarflow import Model, Plan, load_checkpoint, model_hash

from . import shards as sh
from .history import HistoryRow, append_history, read_history
from .report import ModelResult, ReportData, write_report
from .runconfig import RunConfig

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


@dataclass
class RunResult:
    """What a run produced: stage records, the plan, FID and the comparison the report shows."""

    config: RunConfig
    stages: list[StageRecord] = field(default_factory=list)
    plan: Plan | None = None
    plan_path: str = ""
    samples: str = ""
    fid: dict = field(default_factory=dict)
    model_result: ModelResult | None = None
    report: str = ""

    def stage(self, name: str) -> StageRecord:
        return next(s for s in self.stages if s.name == name)

    def to_dict(self) -> dict:
        return {"name": self.config.name, "config": self.config.to_dict(), "plan": self.plan_path,
                "samples": self.samples, "fid": self.fid, "report": self.report,
                "stages": [asdict(s) for s in self.stages]}


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Store:
    """Small files of a run under its output URI: read, atomic write, existence."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.base = sh.resolve(self.uri)
        self.fs.create_dir(self.base, recursive=True)

    def path(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(f"{self.base}/{name}").type != pafs.FileType.NotFound

    def read_text(self, name: str) -> str:
        with self.fs.open_input_stream(f"{self.base}/{name}") as f:
            return f.read().decode()

    def write_text(self, name: str, text: str) -> None:
        sh.write_atomic(self.fs, f"{self.base}/{name}", text.encode())

    def local_copy(self, name: str, workdir: Path) -> Path:
        """A local file with the content of `name` (the file itself for local outputs)."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            return Path(self.base) / name
        target = workdir / name.replace("/", "_")
        target.write_text(self.read_text(name))
        return target


def ensure_ray() -> None:
    """Join the cluster in RAY_ADDRESS, else start a private local Ray sized to this machine."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        log.info("starting a local Ray (%d CPUs)", os.cpu_count() or 1)
        ray.init(address="local", include_dashboard=False, log_to_driver=False)


def load_model(cfg: RunConfig) -> Model:
    path = cfg.model.checkpoint
    if path == "demo":
        from tarflow.demo import demo_checkpoint

        path = str(demo_checkpoint())
    return load_checkpoint(path, in_channels=cfg.model.in_channels)


def checkpoint_path(cfg: RunConfig) -> str:
    if cfg.model.checkpoint == "demo":
        from tarflow.demo import demo_checkpoint

        return str(demo_checkpoint())
    return cfg.model.checkpoint


def actor_threads(cfg: RunConfig) -> int:
    """Torch threads of one generate actor, as workflows.generate gives them: the comparison runs alike."""
    return max(1, int(cfg.resources.generate.num_cpus))


def _guidance_kwargs(cfg: RunConfig) -> dict:
    g = cfg.sampling.guidance
    return {"guidance": g.scale, "attn_temp": g.attn_temp, "annealed_guidance": g.annealed, "guide_what": g.what}


def _labels(cfg: RunConfig) -> str:
    labels = cfg.sampling.labels
    return ",".join(str(y) for y in labels) if isinstance(labels, list) else labels


# ---- stages --------------------------------------------------------------------------------------------------


def _profile(cfg: RunConfig, model: Model, store: Store, name: str) -> None:
    from .profile import profile_model

    ensure_ray()
    res = cfg.resources.profile
    profile = profile_model(model, data=cfg.calibration.data, num_images=cfg.calibration.num_images,
                            batch_size=cfg.sampling.batch_size, guidance=[cfg.sampling.guidance.scale],
                            device=cfg.device, seed=cfg.sampling.seed, num_cpus=max(1, int(res.num_cpus)),
                            checkpoint=cfg.model.checkpoint)
    store.write_text(name, profile.to_json())


def _plan(cfg: RunConfig, model: Model, store: Store, name: str, profile_file: Path | None) -> None:
    from . import schedule

    if cfg.plan.source == "path":
        plan = Plan.load(cfg.plan.path)
    elif cfg.plan.source == "hand":
        plan = schedule.hand_plan(cfg.plan.hand, model)
    else:
        from .profile import Profile

        from .compare import torch_threads

        # the scheduler times its candidate plans here: at one generate actor's threads, as they will run
        with torch_threads(actor_threads(cfg)):
            plan = schedule.schedule(Profile.load(profile_file), model, tol=cfg.plan.tol,
                                     guidance=cfg.sampling.guidance.scale)
    plan.check_model(len(model.blocks), model.num_tokens, model_hash(model))
    store.write_text(name, plan.validate().to_json())


def _generate(cfg: RunConfig, samples: str, plan_file: Path) -> dict:
    from .generate import GenerateConfig, generate

    ensure_ray()
    res = cfg.resources.generate
    g = cfg.sampling.guidance
    gen = GenerateConfig(checkpoint=checkpoint_path(cfg), out=samples, num_samples=cfg.sampling.num_samples,
                         seed=cfg.sampling.seed, plan=str(plan_file), in_channels=cfg.model.in_channels,
                         labels=_labels(cfg), guidance=g.scale, attn_temp=g.attn_temp, annealed_guidance=g.annealed,
                         guide_what=g.what, denoise=cfg.sampling.denoise, batch_size=cfg.sampling.batch_size,
                         shard_size=cfg.sampling.shard_size, actors=res.actors, gpus_per_actor=res.num_gpus,
                         cpus_per_actor=res.num_cpus)
    summary = generate(gen, progress=True)
    log.info(summary.text())
    return asdict(summary)


def _fid(cfg: RunConfig, samples: str) -> dict:
    from .evaluate import ExtractConfig, evaluate_fid

    ensure_ray()
    res = cfg.resources.fid
    result = evaluate_fid(samples, cfg.fid.reference,
                          ExtractConfig(extractor=cfg.fid.extractor, weights_path=cfg.fid.weights, actors=res.actors,
                                        gpus_per_actor=res.num_gpus, cpus_per_actor=res.num_cpus, progress=True))
    log.info(result.text())
    return asdict(result)


def _block_metrics(profile_file: Path | None, guidance: float) -> list[dict] | None:
    if profile_file is None:
        return None
    from .profile import Profile

    case = Profile.load(profile_file).case(guidance)
    return [{"crm_share": b.crm_share, "igm_z": b.igm.get("z"), "igm_zeros": b.igm.get("zeros")} for b in case.blocks]


def _report(cfg: RunConfig, model: Model, plan: Plan, fid: dict, profile_file: Path | None, result: RunResult,
            history_uri: str) -> ReportData:
    from .compare import compare_plans

    label = "auto plan" if cfg.plan.source == "auto" else f"{cfg.plan.source} plan"
    mr = compare_plans(model, {label: plan}, num_images=cfg.sampling.batch_size, seed=cfg.sampling.seed,
                       labels=cfg.sampling.labels, guidance=_guidance_kwargs(cfg), repeats=2, name=cfg.name,
                       block_metrics=_block_metrics(profile_file, cfg.sampling.guidance.scale),
                       threads=actor_threads(cfg))
    if fid:
        mr.run(label).fid = fid.get("fid")
        mr.fid_extractor, mr.fid_num_samples = fid["extractor"], fid["sample_count"]
    seq, planned = mr.runs[0], mr.runs[1]
    row = HistoryRow(datetime.now(timezone.utc).isoformat(timespec="seconds"), cfg.name, mr.model_hash, label,
                     plan.fingerprint(), mr.device, cfg.sampling.batch_size, seq.seconds, planned.seconds,
                     planned.speedup, seq.passes, planned.passes, planned.max_abs_error, None, planned.fid,
                     mr.fid_extractor, mr.fid_num_samples)
    append_history(history_uri, [row])
    notes = [f"config: {cfg.name} -> {cfg.output}", f"plan: {result.plan_path}", f"samples: {result.samples}",
             f"timings: best of 2 on one batch of {cfg.sampling.batch_size}, {actor_threads(cfg)} torch thread(s) as "
             "one generate actor, same noise for every sampler"]
    return ReportData(f"tarflow-gs run: {cfg.name}", [mr], [r.point() for r in read_history(history_uri)], notes)


# ---- driver --------------------------------------------------------------------------------------------------


def run(cfg: RunConfig, stop_after: str | None = None) -> RunResult:
    """Run (or resume) every stage of `cfg`; `stop_after` ends early after that stage (for tests and debugging)."""
    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"stop_after={stop_after!r}: allowed values are {', '.join(STAGES)}")
    cfg.validate()
    model = load_model(cfg)
    store = Store(cfg.output)
    mhash = model_hash(model)
    result = RunResult(cfg)
    workdir = Path(tempfile.mkdtemp(prefix="tarflow-gs-run-"))
    d = cfg.to_dict()

    def stage(name: str, key: str, output: str, done, work) -> bool:
        """Run `work` unless `done()` says the output for this key exists; records either way."""
        start = time.perf_counter()
        skipped = done()
        if skipped:
            log.info("[%s] skipped: %s exists for these inputs (key %s)", name, output, key)
        else:
            log.info("[%s] running (key %s)", name, key)
            try:
                work()
            except Exception as e:
                _write_index(store, result)
                raise PipelineError(f"stage '{name}' failed: {type(e).__name__}: {e}. Finished stages are kept; "
                                    "re-run the same command to resume here.") from e
        result.stages.append(StageRecord(name, key, output, skipped, time.perf_counter() - start))
        _write_index(store, result)
        return stop_after == name

    # profile: only the auto plan needs one
    profile_file = None
    profile_key = _hash("profile", mhash, d["calibration"], d["device"], cfg.sampling.batch_size,
                        cfg.sampling.guidance.scale, cfg.sampling.seed)
    if cfg.plan.source == "auto":
        name = f"stages/profile-{profile_key}.json"
        if stage("profile", profile_key, store.path(name), lambda: store.exists(name),
                 lambda: _profile(cfg, model, store, name)):
            return result
        profile_file = store.local_copy(name, workdir)

    plan_key = _hash("plan", mhash, d["plan"], profile_key if cfg.plan.source == "auto" else None,
                     Path(cfg.plan.path).read_text() if cfg.plan.path and Path(cfg.plan.path).is_file() else None)
    plan_name = f"stages/plan-{plan_key}.json"
    if stage("plan", plan_key, store.path(plan_name), lambda: store.exists(plan_name),
             lambda: _plan(cfg, model, store, plan_name, profile_file)):
        return result
    plan_file = store.local_copy(plan_name, workdir)
    plan = result.plan = Plan.load(plan_file)
    result.plan_path = store.path(plan_name)

    gen_key = _hash("generate", mhash, plan.fingerprint(), d["sampling"], d["device"])
    samples = store.path(f"samples-{gen_key}")
    result.samples = samples

    def samples_complete() -> bool:
        try:
            return sh.read_manifest(samples).complete
        except (sh.ShardError, OSError):
            return False

    if stage("generate", gen_key, samples, samples_complete, lambda: _generate(cfg, samples, plan_file)):
        return result

    fid_key = _hash("fid", gen_key, d["fid"])
    fid_name = f"stages/fid-{fid_key}.json"
    if cfg.fid.enabled:
        if stage("fid", fid_key, store.path(fid_name), lambda: store.exists(fid_name),
                 lambda: store.write_text(fid_name, json.dumps(_fid(cfg, samples), indent=2))):
            return result
        result.fid = json.loads(store.read_text(fid_name))

    report_key = _hash("report", gen_key, fid_key if cfg.fid.enabled else None, d["name"])
    report_dir = f"reports/{report_key}"

    def make_report() -> None:
        data = _report(cfg, model, plan, result.fid, profile_file, result, store.path("history.parquet"))
        local = workdir / "report"
        write_report(data, local)
        for f in ("report-data.json", "report.json", "report.html"):  # report.html last: it marks the stage done
            store.write_text(f"{report_dir}/{f}", (local / f).read_text())

    stage("report", report_key, store.path(f"{report_dir}/report.html"),
          lambda: store.exists(f"{report_dir}/report.html"), make_report)
    for f in ("report.html", "report.json"):  # the latest report at a fixed place, also when the stage was skipped
        store.write_text(f, store.read_text(f"{report_dir}/{f}"))
    result.model_result = ReportData.from_json(store.read_text(f"{report_dir}/report-data.json")).models[0]
    result.report = store.path("report.html")
    _write_index(store, result)
    return result


def _write_index(store: Store, result: RunResult) -> None:
    store.write_text("run.json", json.dumps(result.to_dict(), indent=2))
