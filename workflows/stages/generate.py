"""The generate stage: a pool of Ray actors samples shards of images and streams them to Parquet.

Work is cut into shards of `shard_size` consecutive sample ids and each shard into batches
of the spec's batch size; the cut depends on the settings alone, and sample i's noise on
(seed, i) and its label on the label policy and i, so images do not depend on how many
actors run or which one takes a shard. The driver reads the checkpoint once, for the run's
identity (`RunIdentity`: what decides the images), and hands out shards (`storage.shards.Shard`:
index, file, sample ids); each actor loads the model from its reference once (Ray's
batch-inference pattern), samples a shard's ids and writes the shard whole. The driver records
finished shards in the manifest, so its memory does not grow with the number of samples.

An actor that dies mid-shard (killed, out of memory) is restarted by Ray and the shard
redone; a shard is renamed into place only when complete, so every id ends up exactly
once. Re-running the same command skips the shards in the manifest.
"""
from __future__ import annotations

import logging
import platform
import socket
import time
from dataclasses import dataclass, field
from typing import Annotated, Callable

import numpy as np
import pyarrow.fs as pafs
from pydantic import AfterValidator, BaseModel, Field, NonNegativeInt, PositiveInt, ValidationError

from tarflow import Model, Plan, SamplingSpec, model_hash, sample_ids
from tarflow.schema import STRICT_FIELDS, describe, validate

from .. import runtime, versions
from ..config import GenerateConfig, Resources, SampleSet
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


# ---- what decides the images -------------------------------------------------------------------------------------

def _a_sampling_spec(spec: dict) -> dict:
    validate(SamplingSpec, spec, "")
    return spec  # kept as written: a resume compares it field by field


class Numerics(BaseModel):
    """What decides pixels besides the inputs: the workers' torch threads and their device type (None
    until the first worker starts)."""

    model_config = STRICT_FIELDS
    threads: PositiveInt
    device: str | None = None


class RunIdentity(BaseModel):
    """What decides a generation run's images, the one definition: built once from the inputs (`of`),
    recorded in the manifest (`settings`) and in every shard's metadata, compared field by field on
    resume, and hashed into the pipeline's generate key (`pipeline.keys.generate`). Its JSON form is
    what every earlier version wrote."""

    model_config = STRICT_FIELDS
    model_hash: str
    plan_hash: str  # `Plan.fingerprint`: the plan's fields that change samples
    spec: Annotated[dict, AfterValidator(_a_sampling_spec)]  # the sampling spec's JSON form (`SamplingSpec.to_dict`)
    num_samples: PositiveInt
    shard_size: PositiveInt
    image_shape: Annotated[list[PositiveInt], Field(min_length=3, max_length=3)]  # (C, H, W)
    num_classes: NonNegativeInt  # 0: an unconditional model
    numerics: Numerics

    @classmethod
    def of(cls, model: Model, mhash: str, plan: Plan, spec: SamplingSpec, samples: SampleSet,
           resources: Resources) -> "RunIdentity":
        """The identity of sampling `samples` from `model` (whose hash is `mhash`) under `plan` and `spec` (concrete
        for the model) on workers with `resources`."""
        c = model.config
        return cls(model_hash=mhash, plan_hash=plan.fingerprint(), spec=spec.to_dict(),
                   num_samples=samples.num_samples, shard_size=samples.shard_size,
                   image_shape=[c.in_channels, c.img_size, c.img_size], num_classes=c.num_classes,
                   numerics=Numerics(threads=runtime.worker_threads(resources)))

    @classmethod
    def from_settings(cls, settings, where: str) -> "RunIdentity":
        try:
            return cls.model_validate(settings)
        except ValidationError as e:
            raise sh.ShardError(f"{where}: its run identity is not one this build reads "
                                f"({describe(e, cls, 'settings')})") from None

    def to_dict(self) -> dict:
        return self.model_dump()

    def with_device(self, device: str | None) -> "RunIdentity":
        return self.model_copy(update={"numerics": self.numerics.model_copy(update={"device": device})})

    def difference(self, now: "RunIdentity") -> str:
        """`spec.seed=11 there vs 12 now; ...` for every field where `now` differs from this recorded
        identity (a device not yet known on one side is no difference: the first worker records it)."""
        a, b = _flatten(self.to_dict()), _flatten(now.to_dict())
        return "; ".join(f"{k}={a.get(k)!r} there vs {b.get(k)!r} now" for k in sorted(set(a) | set(b))
                         if a.get(k) != b.get(k) and not (k == "numerics.device" and None in (a.get(k), b.get(k))))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_inputs(cfg: GenerateConfig) -> tuple[GenerateConfig, RunIdentity]:
    """`cfg` with its spec made concrete for the model and its plan (default sequential) checked against
    both, and the run's identity: the driver's one read of the checkpoint (the workers load their own)."""
    model, provenance = cfg.model.load(with_metadata=True)
    spec = cfg.spec.for_model(model.config.num_classes, provenance)
    mhash = model_hash(model)
    plan = cfg.plan or Plan.sequential(len(model.blocks), model.num_tokens)
    plan.check_model(len(model.blocks), model.num_tokens, mhash)
    plan.check_spec(spec)
    cfg = cfg.model_copy(update={"spec": spec, "plan": plan})
    return cfg, RunIdentity.of(model, mhash, plan, spec, cfg.samples, cfg.resources)


# ---- the driver's view of the output -----------------------------------------------------------------------------

@dataclass
class Job:
    """What the driver works from: the checked config, the identity, the manifest as it stands, the shards to do."""

    config: GenerateConfig  # spec concrete, plan checked (`read_inputs`)
    identity: RunIdentity
    manifest: sh.Manifest
    pending: list[int] = field(default_factory=list)
    unverified: list[sh.ShardEntry] = field(default_factory=list)  # listed; the actors check them first
    notes: list[str] = field(default_factory=list)  # what the resume found and will redo

    @classmethod
    def new(cls, cfg: GenerateConfig, identity: RunIdentity) -> "Job":
        return cls(cfg, identity, sh.Manifest(identity.to_dict(), identity.num_samples, identity.shard_size))


def _with_pending(job: Job) -> Job:
    done = {e.index for e in job.manifest.shards}
    job.pending = [i for i in range(job.manifest.num_shards) if i not in done]
    return job


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


def _recover(job: Job) -> int:
    """Add the shards that prove on their own they belong to this run (a lost manifest); returns how many."""
    found = 0
    for entry, meta in sh.recover_entries(job.config.out, job.manifest):
        try:
            made_by = RunIdentity.from_settings(meta.get("settings"), entry.file)
        except sh.ShardError:
            continue
        if not made_by.difference(job.identity):
            job.manifest.add(entry)
            job.identity = job.identity.with_device(made_by.numerics.device)  # the device the rest must match
            found += 1
    return found


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
        job.notes.append(f"{e}; recovered {_recover(job)} shard(s) that verify on their own")
        return
    there = RunIdentity.from_settings(existing.settings, f"{cfg.out}/{sh.MANIFEST_NAME}")
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


# ---- the workers -------------------------------------------------------------------------------------------------

class ShardWorker(runtime.Worker):
    """Ray actor: loads the model once (Ray's batch-inference pattern) and writes whole shards."""

    def __init__(self, cfg: GenerateConfig, identity: RunIdentity, provenance: dict, run_id: str, threads: int):
        super().__init__(threads)
        model = cfg.model.load()
        found = model_hash(model)
        if found != identity.model_hash:
            raise GenerateError(f"{cfg.model.checkpoint} is model {found} on {socket.gethostname()}, the run samples "
                                f"model {identity.model_hash}: every worker must read the driver's checkpoint (a "
                                "shared volume or a store URI), unchanged while the run lasts")
        self.model = model.to(self.device)
        self.spec, self.plan, self.out = cfg.spec, cfg.plan, cfg.out
        self.identity = identity.with_device(self.device.type)  # a shard names the device it was made on
        self.provenance, self.run_id = provenance, run_id

    def verify(self, entry: sh.ShardEntry) -> str | None:
        """Why a listed shard fails its checks (streaming sha256), or None."""
        return sh.check_entry(self.out, entry)

    def write_shard(self, shard: sh.Shard) -> sh.ShardEntry:
        """The shard's ids sampled in batches of the spec's size and written as one file; its entry."""
        start = time.perf_counter()
        B, num_blocks = self.spec.batch_size, len(self.model.blocks)
        pngs, labels, passes, fallbacks, residual = [], [], [], [], []
        block_passes, total_fallbacks = [0] * num_blocks, 0
        for s in range(0, len(shard.sample_ids), B):
            ids = shard.sample_ids[s : s + B]
            out = sample_ids(self.model, self.spec, ids, self.plan, self.device)
            pngs += [sh.encode_png(im) for im in sh.to_uint8(out.images.float().cpu())]
            labels.append(np.full(len(ids), -1) if out.labels is None else out.labels.cpu().numpy())
            per_block = [0] * num_blocks
            for b in out.stats.blocks:
                per_block[b.block] = b.passes
                block_passes[b.block] += b.passes
            passes += [per_block] * len(ids)
            fallbacks += [out.stats.fallbacks] * len(ids)
            total_fallbacks += out.stats.fallbacks
            residual += [max((b.residual for b in out.stats.blocks), default=0.0)] * len(ids)
        table = sh.shard_table(shard.sample_ids, np.concatenate(labels), self.spec.seed, pngs, passes, fallbacks,
                               residual)
        stats = {"batches": -(-len(shard.sample_ids) // B), "block_passes": block_passes,
                 "fallbacks": total_fallbacks, "device": self.device.type}
        meta = {"settings": self.identity.to_dict(), "provenance": self.provenance, "shard": shard.index,
                "stats": stats, "first_id": shard.sample_ids[0], "last_id": shard.sample_ids[-1]}
        entry = shard.write(self.out, table, meta, stats, owner=self.run_id)
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
    num_blocks = job.config.plan.num_blocks
    totals = [sum(e.stats.get("block_passes", [0] * num_blocks)[b] for e in entries) for b in range(num_blocks)]
    return GenerateSummary(job.config.out, job.manifest.num_samples, written, len(entries) - written, samples,
                           seconds, [t / batches if batches else 0.0 for t in totals],
                           sum(e.stats.get("fallbacks", 0) for e in entries),
                           pool.replacements if pool else 0, pool.placements if pool else [], job.notes)


def _check_device(job: Job, device: str, worker: str) -> None:
    """Every shard of a run is made on one device type: the first worker's, recorded in the manifest."""
    made_on = job.identity.numerics.device
    if made_on is None:
        job.identity = job.identity.with_device(device)
        _write_manifest(job)
    elif made_on != device:
        raise GenerateError(f"{worker} samples on {device}, but {job.config.out} is made on {made_on} "
                            f"(numerics.device={made_on!r} there vs {device!r} now): images would depend "
                            "on where each shard ran; give every worker the same kind of device")


def _write_manifest(job: Job) -> None:
    """The manifest as the run stands: its identity (the device, once known) and the shards so far."""
    job.manifest.settings = job.identity.to_dict()
    _write("write the manifest", job.config, sh.write_manifest, job.config.out, job.manifest)


def generate(cfg: GenerateConfig, progress: bool | None = None,
             on_shard: Callable[[sh.ShardEntry], None] | None = None,
             identity: RunIdentity | None = None) -> GenerateSummary:
    """Run (or resume) a generation; returns the summary.

    Raises before any sampling on bad input: a missing or corrupt checkpoint, a plan for another model or
    sampling map, labels or guidance the model cannot take (before the output is touched), an output that
    is a file or holds a run with other settings. Resuming, it redoes every listed shard that is missing or
    fails its checksum (hashed in the driver up to LOCAL_VERIFY_BYTES, the rest in the actors) and keeps a
    lost manifest's shards that verify on their own. The run holds the output's lease throughout (a second
    writer is refused); `on_shard` is called in the driver after each shard is committed (progress for
    callers). `identity`: where the caller has read the model already (a pipeline run), the run's identity,
    with `cfg` as `read_inputs` returns it; None: `read_inputs(cfg)` here."""
    if identity is None:
        cfg, identity = read_inputs(cfg)  # every input checked before the output is touched
    runtime.check_reachable()  # and the cluster, if one is named
    _check_output(cfg.out)  # what is in the way would fail the lease with a less useful message
    try:
        lease = Lease(cfg.out).acquire()
    except OSError as e:
        raise GenerateError(f"output {cfg.out} is not writable: {e}") from e
    try:
        job = Job.new(cfg, identity)
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
    provenance = {"checkpoint": cfg.model.checkpoint, "plan": cfg.plan.to_dict(), "software": software_versions()}
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
    args = (cfg, job.identity, provenance, lease.run_id)
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
            shards = ((ShardWorker.write_shard, (job.manifest.shard(index),)) for index in job.pending)
            for _, entry in pool.map_unordered(shards):
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
