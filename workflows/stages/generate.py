"""The generate stage: a pool of Ray actors samples shards of images and streams them to Parquet.

Work is cut into shards of `shard_size` consecutive sample ids and each shard into batches
of the spec's batch size; the cut depends on the settings alone, and sample i's noise on
(seed, i) and its label on the label policy and i, so images do not depend on how many
actors run or which one takes a shard. Each actor loads the model once (Ray's
batch-inference pattern) and writes whole shards itself; the driver only hands out shard
indices and records finished shards in the manifest, so its memory does not grow with the
number of samples.

An actor that dies mid-shard (killed, out of memory) is restarted by Ray and the shard
redone; a shard is renamed into place only when complete, so every id ends up exactly
once. Re-running the same command skips the shards in the manifest.
"""
from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow.fs as pafs
import ray

from tarflow import Model, ModelConfig, Plan, SamplingSpec, model_hash, sample_ids

from .. import runtime, versions
from ..config import GenerateConfig
from ..progress import Progress
from ..storage import shards as sh
from ..storage.files import check_creatable, join, remove_temporaries, resolve
from ..storage.lease import Lease

log = logging.getLogger(__name__)


class GenerateError(RuntimeError):
    """Generation cannot start (bad settings, output in use by another run) or could not finish."""


def software_versions() -> dict:
    return {"python": platform.python_version(),
            **{dist: versions.installed(dist) for dist in ("tarflow-gs", "torch", "ray", "pyarrow", "numpy", "pillow")}}


LOCAL_VERIFY_BYTES = 1 << 30  # a resume hashes up to this much in the driver; larger sets, in the actors


@dataclass
class Job:
    """What the driver resolved before any work: the concrete spec, plan, identity, weights, shards to do."""

    config: GenerateConfig
    spec: SamplingSpec
    plan: Plan
    identity: sh.RunIdentity
    model_config: dict
    state_dict: dict
    manifest: sh.Manifest
    pending: list[int]
    unverified: list[sh.ShardEntry] = field(default_factory=list)  # listed; the actors check them first
    notes: list[str] = field(default_factory=list)  # what the resume found and will redo


def _with_pending(job: Job) -> Job:
    done = {e.index for e in job.manifest.shards}
    job.pending = [i for i in range(job.manifest.num_shards) if i not in done]
    return job


def _inputs(cfg: GenerateConfig) -> Job:
    """The job as the inputs define it (model, concrete spec, plan, identity), before the output is read."""
    model, provenance = cfg.model.load(with_metadata=True)
    spec = cfg.spec.for_model(model.config.num_classes, provenance)
    mhash = model_hash(model)
    plan = cfg.plan or Plan.sequential(len(model.blocks), model.num_tokens)
    plan.check_model(len(model.blocks), model.num_tokens, mhash)
    plan.check_spec(spec)
    c = model.config
    identity = sh.RunIdentity(model_hash=mhash, plan_hash=plan.fingerprint(), spec=spec.to_dict(),
                              num_samples=cfg.samples.num_samples, shard_size=cfg.samples.shard_size,
                              image_shape=[c.in_channels, c.img_size, c.img_size], num_classes=c.num_classes,
                              numerics=sh.Numerics(threads=runtime.worker_threads(cfg.resources)))
    return Job(cfg, spec, plan, identity, c.to_dict(), {k: v.detach().cpu() for k, v in model.state_dict().items()},
               sh.Manifest(identity.to_dict(), cfg.samples.num_samples, cfg.samples.shard_size), [])


def _check_output(out: str) -> None:
    """Raise before the lease tries: a file at the output, a run's folder, a path that cannot be created."""
    fs, base = resolve(out)
    kind = fs.get_file_info(base).type
    if kind == pafs.FileType.File:
        raise GenerateError(f"output {out} is a file; give a directory (or URI prefix) for the shards")
    if kind == pafs.FileType.Directory and fs.get_file_info(join(base, "run.json")).type == pafs.FileType.File:
        raise GenerateError(f"output {out} is the folder of a `tarflow-gs run` (it holds run.json): its sample "
                            "sets are its samples-<key>/ folders; give generate a new or empty output")
    if kind == pafs.FileType.NotFound:
        try:
            check_creatable(out)
        except OSError as e:
            raise GenerateError(f"cannot create output {out}: {e}") from None


def _read_output(job: Job) -> None:
    """Fill `job.manifest` from an existing output, checking it holds this run, and find what to redo."""
    cfg = job.config
    fs, base = resolve(cfg.out)  # checked by `_check_output` before this run took the lease
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))]
    if sh.MANIFEST_NAME not in names:
        data = fs.get_file_info(pafs.FileSelector(join(base, sh.DATA_DIR), allow_not_found=True))
        if any(n.endswith(".parquet") for n in names + [i.base_name for i in data]):
            raise GenerateError(f"output {cfg.out} holds Parquet files but no {sh.MANIFEST_NAME}: it is not a "
                                "tarflow-gs shard set; choose an empty or new output")
        return
    try:
        existing = sh.read_manifest(cfg.out)
    except sh.ShardError as e:
        # a lost manifest: keep the shards that prove on their own they belong to this run
        recovered, device = sh.recover_entries(cfg.out, job.identity, job.manifest)
        job.notes.append(f"{e}; recovered {len(recovered)} shard(s) that verify on their own")
        for entry in recovered:
            job.manifest.add(entry)
        job.identity = job.identity.with_device(device)
        return
    there = sh.RunIdentity.from_settings(existing.settings, f"{cfg.out}/{sh.MANIFEST_NAME}")
    diff = there.difference(job.identity)
    if diff:
        raise GenerateError(f"output {cfg.out} already holds a run with different settings ({diff}); "
                            "re-run with the original settings to resume, or choose another output")
    job.identity = job.identity.with_device(there.numerics.device)
    budget = LOCAL_VERIFY_BYTES
    for entry in existing.shards:
        if budget < entry.size_bytes:  # listed until an actor says otherwise: a crash before then loses nothing
            job.unverified.append(entry)
            job.manifest.add(entry)
            continue
        budget -= entry.size_bytes
        problem = sh.check_entry(cfg.out, entry)
        if problem:
            job.notes.append(f"{entry.file} {problem}: it will be generated again")
        else:
            job.manifest.add(entry)


class ShardWorker(runtime.Worker):
    """Ray actor: holds the model once and writes whole shards (Ray's batch-inference pattern)."""

    def __init__(self, job: dict, out: str, run_id: str, threads: int):
        super().__init__(threads)
        # `job` (model, spec, plan, identity, provenance) is put once by the driver, which holds it while the
        # pool lives: a restarted actor gets it again (`runtime._Host`); losing the driver's node loses the run
        model = Model.from_config(ModelConfig(**job["model_config"]))
        model.load_state_dict(job["state_dict"])
        self.model = model.eval().to(self.device)
        self.spec, self.plan, self.provenance, self.out, self.run_id = (job["spec"], job["plan"], job["provenance"],
                                                                          out, run_id)
        identity: sh.RunIdentity = job["identity"]
        self.identity = identity.with_device(self.device.type)  # a shard names the device it was made on
        self.layout = sh.Manifest(identity.to_dict(), identity.num_samples, identity.shard_size)

    def verify(self, entry: sh.ShardEntry) -> str | None:
        """Why a listed shard fails its checks (streaming sha256), or None."""
        return sh.check_entry(self.out, entry)

    def write_shard(self, index: int) -> sh.ShardEntry:
        ids_all = np.asarray(self.layout.shard_ids(index), np.int64)
        B = self.spec.batch_size
        pngs, labels, passes, fallbacks, residual = [], [], [], [], []
        num_blocks = len(self.model.blocks)
        block_passes, total_fallbacks = [0] * num_blocks, 0
        start = time.perf_counter()
        for s in range(0, len(ids_all), B):
            ids = ids_all[s : s + B].tolist()
            out = sample_ids(self.model, self.spec, ids, self.plan, self.device)
            y = self.spec.labels_for(ids, self.model.config.num_classes)
            pngs += [sh.encode_png(im) for im in sh.to_uint8(out.images.float().cpu())]
            labels.append(np.full(len(ids), -1, np.int64) if y is None else y.numpy())
            per_block = [0] * num_blocks
            for b in out.stats.blocks:
                per_block[b.block] = b.passes
                block_passes[b.block] += b.passes
            passes += [per_block] * len(ids)
            fallbacks += [out.stats.fallbacks] * len(ids)
            total_fallbacks += out.stats.fallbacks
            residual += [max((b.residual for b in out.stats.blocks), default=0.0)] * len(ids)
        table = sh.shard_table(ids_all, np.concatenate(labels), self.spec.seed, pngs, passes, fallbacks, residual)
        stats = {"batches": -(-len(ids_all) // B), "block_passes": block_passes, "fallbacks": total_fallbacks,
                 "device": self.device.type}
        meta = {"settings": self.identity.to_dict(), "provenance": self.provenance, "shard": index, "stats": stats,
                "first_id": int(ids_all[0]), "last_id": int(ids_all[-1])}
        entry = sh.write_shard(self.out, self.layout, index, table, meta, stats, owner=self.run_id)
        entry.stats["seconds"] = time.perf_counter() - start  # sampling, encoding and the write
        return entry


@dataclass
class GenerateSummary:
    out: str
    num_samples: int
    shards_written: int
    shards_skipped: int
    samples_written: int
    seconds: float
    block_passes_per_batch: list[float] = field(default_factory=list)  # forward block order
    fallbacks: int = 0
    actor_replacements: int = 0
    placements: list[dict] = field(default_factory=list)  # where each actor ran
    notes: list[str] = field(default_factory=list)  # what a resume found damaged and redid

    @property
    def images_per_s(self) -> float:
        return self.samples_written / self.seconds if self.seconds > 0 else 0.0

    def text(self) -> str:
        blocks = ", ".join(f"{p:.1f}" for p in self.block_passes_per_batch)
        return (f"{self.out}: {self.num_samples} samples complete; wrote {self.samples_written} in "
                f"{self.shards_written} shard(s) ({self.shards_skipped} already done) in {self.seconds:.1f}s = "
                f"{self.images_per_s:.1f} images/s\n"
                f"  network passes per batch by block (forward order): [{blocks}]; fallbacks: {self.fallbacks}; "
                f"actors replaced: {self.actor_replacements}"
                + "".join(f"\n  resume: {note}" for note in self.notes))


def _summarize(job: Job, written: int, samples: int, seconds: float, pool: runtime.ActorPool | None) -> GenerateSummary:
    entries = job.manifest.shards
    batches = sum(e.stats.get("batches", 0) for e in entries)
    num_blocks = job.plan.num_blocks
    totals = [sum(e.stats.get("block_passes", [0] * num_blocks)[b] for e in entries) for b in range(num_blocks)]
    return GenerateSummary(job.config.out, job.manifest.num_samples, written, len(entries) - written, samples,
                           seconds, [t / batches if batches else 0.0 for t in totals],
                           sum(e.stats.get("fallbacks", 0) for e in entries),
                           pool.replacements if pool else 0, pool.placements if pool else [], job.notes)


def _check_device(job: Job, device: str, where: str) -> None:
    """Every shard of a run is made on one device type: the first worker's, recorded in the manifest."""
    made_on = job.identity.numerics.device
    if made_on is None:
        job.identity = job.identity.with_device(device)
        _write_manifest(job)
    elif made_on != device:
        raise GenerateError(f"{where} samples on {device}, but {job.config.out} is made on {made_on} "
                            f"(numerics.device={made_on!r} there vs {device!r} now): images would depend "
                            "on where each shard ran; give every worker the same kind of device")


def _write_manifest(job: Job) -> None:
    """The manifest as the run stands: its identity (the device, once known) and the shards so far."""
    job.manifest.settings = job.identity.to_dict()
    _write("write the manifest", job.config, sh.write_manifest, job.config.out, job.manifest)


def generate(cfg: GenerateConfig, progress: bool | None = None,
             on_shard: Callable[[sh.ShardEntry], None] | None = None) -> GenerateSummary:
    """Run (or resume) a generation; returns the summary.

    Raises before any sampling on bad input: a missing or corrupt checkpoint, a plan for another model or
    sampling map, labels or guidance the model cannot take (before the output is touched), an output that
    is a file or holds a run with other settings. Resuming, it redoes every listed shard that is missing or
    fails its checksum (hashed in the driver up to LOCAL_VERIFY_BYTES, the rest in the actors) and keeps a
    lost manifest's shards that verify on their own. The run holds the output's lease throughout (a second
    writer is refused); `on_shard` is called in the driver after each shard is committed (progress for
    callers)."""
    job = _inputs(cfg)  # every input checked before the output is touched
    runtime.check_reachable()  # and the cluster, if one is named
    _check_output(cfg.out)  # what is in the way would fail the lease with a less useful message
    try:
        lease = Lease(cfg.out).acquire()
    except OSError as e:
        raise GenerateError(f"output {cfg.out} is not writable: {e}") from e
    try:
        _read_output(job)  # under the lease: nobody else changes the output from here on
        return _generate(_with_pending(job), lease, progress, on_shard)
    finally:
        lease.release()


def _write(what: str, cfg: GenerateConfig, write, *args):
    """`write(*args)`, an OSError (a full disk, a lost mount) turned into a message that keeps the work."""
    try:
        return write(*args)
    except OSError as e:
        raise GenerateError(f"cannot {what} under {cfg.out}: {e}; finished shards are kept, re-run the same "
                            "command to resume") from e


def _generate(job: Job, lease: Lease, progress: bool | None, on_shard) -> GenerateSummary:
    cfg = job.config
    for note in job.notes:
        log.warning("%s: %s", cfg.out, note)
    provenance = {"checkpoint": cfg.model.checkpoint, "plan": job.plan.to_dict(), "software": software_versions()}
    job.manifest.provenance = {**provenance, "writer": lease.me}  # shards stay free of per-run ids: a redo is the same bytes
    fs, base = resolve(cfg.out)
    if job.pending or job.unverified:
        runtime.connect()  # before the first write: a cluster that cannot be joined leaves the output as it was
    _write_manifest(job)
    # this run holds the lease: any temporary left here belongs to a run that died
    for folder in ("", sh.DATA_DIR):
        _write("remove stale temporaries", cfg, remove_temporaries, fs, base, folder)
    if not job.pending and not job.unverified:
        return _summarize(job, 0, 0, 0.0, None)
    start = time.perf_counter()  # from here: actor start, model loads, sampling, writes
    work = ray.put({"model_config": job.model_config, "state_dict": job.state_dict, "spec": job.spec,
                    "plan": job.plan, "identity": job.identity, "provenance": provenance})
    args = (work, cfg.out, lease.run_id)
    bar = Progress(job.manifest.num_samples, "generate", "img", progress, initial=job.manifest.rows)
    written = samples = 0
    with runtime.ActorPool(ShardWorker, args, cfg.resources, "generate", cfg.start_timeout_s, cfg.max_attempts,
                           num_actors=min(cfg.resources.actors, len(job.pending) + len(job.unverified))) as pool:
        _check_device(job, pool.start()["device"], "the first generate worker")
        if job.unverified:  # a large set: its listed shards are hashed in the actors, in parallel
            units = [(ShardWorker.verify, (e,)) for e in job.unverified]
            for i, problem in pool.map_unordered(units):
                entry = job.unverified[i]
                if problem:
                    job.notes.append(f"{entry.file} {problem}: it will be generated again")
                    log.warning("%s: %s", cfg.out, job.notes[-1])
                    job.manifest.shards.remove(entry)
                    job.pending.append(entry.index)
                    bar.update(-entry.rows)
            job.pending.sort()
        try:
            for _, entry in pool.map_unordered((ShardWorker.write_shard, (index,)) for index in job.pending):
                lease.check()
                _check_device(job, entry.stats["device"], f"the worker that wrote {entry.file}")
                _write(f"write the record of {entry.file}", cfg, sh.commit_shard, cfg.out, entry)
                job.manifest.add(entry)
                written += 1
                samples += entry.rows
                bar.update(entry.rows)
                if on_shard is not None:
                    on_shard(entry)
        finally:
            bar.close()
        _write_manifest(job)  # fold the records in
        return _summarize(job, written, samples, time.perf_counter() - start, pool)
