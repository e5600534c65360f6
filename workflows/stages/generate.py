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
from dataclasses import asdict, dataclass, field
from importlib import metadata as importlib_metadata
from typing import Callable

import numpy as np
import pyarrow.fs as pafs
import ray
from tqdm import tqdm

from tarflow import Model, ModelConfig, Plan, SamplingSpec, model_hash, sample_ids

from .. import runtime
from ..config import GenerateConfig
from ..storage import shards as sh
from ..storage.files import remove_temporaries, resolve

log = logging.getLogger(__name__)


class GenerateError(RuntimeError):
    """Generation cannot start (bad settings, output in use by another run) or could not finish."""


def software_versions() -> dict:
    versions = {"python": platform.python_version()}
    for dist in ("tarflow-gs", "torch", "ray", "pyarrow", "numpy", "pillow"):
        try:
            versions[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


@dataclass
class Job:
    """What the driver resolved before any work: the concrete spec, plan, identity, weights, pending shards."""

    config: GenerateConfig
    spec: SamplingSpec
    plan: Plan
    identity: dict
    model_config: dict
    state_dict: dict
    manifest: sh.Manifest
    pending: list[int]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def describe_difference(old: dict, new: dict) -> str:
    """`spec.seed=11 there vs 12 now; ...` for every field where two identities differ."""
    a, b = _flatten(old), _flatten(new)
    return "; ".join(f"{k}={a.get(k)!r} there vs {b.get(k)!r} now" for k in sorted(set(a) | set(b))
                     if a.get(k) != b.get(k))


def prepare(cfg: GenerateConfig) -> Job:
    """Check every input and the output before any sampling; returns what the actors need.

    Fails fast on a missing/corrupt checkpoint, a plan for another model or sampling map, labels
    or guidance the model cannot take, an unwritable output, or an output holding a run with other
    settings."""
    model, provenance = cfg.model.load(with_metadata=True)
    spec = cfg.spec.for_model(model.config.num_classes, provenance)
    mhash = model_hash(model)
    plan = cfg.plan or Plan.sequential(len(model.blocks), model.num_tokens)
    plan.check_model(len(model.blocks), model.num_tokens, mhash)
    plan.check_spec(spec)
    c = model.config
    identity = {"model_hash": mhash, "plan_hash": plan.fingerprint(), "spec": spec.to_dict(),
                "num_samples": cfg.samples.num_samples, "shard_size": cfg.samples.shard_size,
                "image_shape": [c.in_channels, c.img_size, c.img_size], "num_classes": c.num_classes}
    manifest = _open_output(cfg, identity, plan)
    done = {e.index for e in manifest.shards}
    pending = [i for i in range(manifest.num_shards) if i not in done]
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return Job(cfg, spec, plan, identity, c.to_dict(), state, manifest, pending)


def _open_output(cfg: GenerateConfig, identity: dict, plan: Plan) -> sh.Manifest:
    """Create the output with a fresh manifest, or check an existing one matches and drop lost shards."""
    fs, base = resolve(cfg.out)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File:
        raise GenerateError(f"output {cfg.out} is a file; give a directory (or URI prefix) for the shards")
    try:
        fs.create_dir(base, recursive=True)
    except OSError as e:
        raise GenerateError(f"cannot create output {cfg.out}: {e}") from e
    if fs.get_file_info(f"{base.rstrip('/')}/{sh.MANIFEST_NAME}").type != pafs.FileType.File:
        existing = [i.base_name for i in fs.get_file_info(pafs.FileSelector(base)) if i.base_name.endswith(".parquet")]
        if existing:
            raise GenerateError(f"output {cfg.out} holds Parquet files ({existing[0]}, ...) but no _manifest.json: "
                                "it is not a tarflow-gs shard set; choose an empty or new output")
        manifest = sh.Manifest(identity, cfg.samples.num_samples, cfg.samples.shard_size)
    else:
        manifest = sh.read_manifest(cfg.out)
        diff = describe_difference(manifest.settings, identity)
        if diff:
            raise GenerateError(f"output {cfg.out} already holds a run with different settings ({diff}); "
                                "re-run with the original settings to resume, or choose another output")
        lost = _lost_shards(cfg.out, manifest)
        if lost:
            log.warning("%s: %d listed shard(s) are missing or changed (%s); they will be generated again",
                        cfg.out, len(lost), ", ".join(e.file for e in lost[:5]))
            manifest.shards = [e for e in manifest.shards if e not in lost]
    manifest.provenance = {"checkpoint": cfg.model.checkpoint, "plan": plan.to_dict(), "software": software_versions()}
    try:
        sh.write_manifest(cfg.out, manifest)
        remove_temporaries(fs, base)
    except OSError as e:
        raise GenerateError(f"output {cfg.out} is not writable: {e}") from e
    return manifest


def _lost_shards(uri: str, manifest: sh.Manifest) -> list[sh.ShardEntry]:
    fs, base = resolve(uri)
    infos = fs.get_file_info([f"{base.rstrip('/')}/{e.file}" for e in manifest.shards])
    return [e for e, i in zip(manifest.shards, infos) if i.type != pafs.FileType.File or i.size != e.size_bytes]


class ShardWorker(runtime.Worker):
    """Ray actor: holds the model once and writes whole shards (Ray's batch-inference pattern)."""

    def __init__(self, model_config: dict, state_dict: dict, spec: SamplingSpec, plan: Plan, identity: dict,
                 provenance: dict, out: str, threads: int):
        super().__init__(threads)
        model = Model.from_config(ModelConfig(**model_config))
        model.load_state_dict(state_dict)
        self.model = model.eval().to(self.device)
        self.spec, self.plan, self.identity, self.provenance, self.out = spec, plan, identity, provenance, out
        self.layout = sh.Manifest(identity, identity["num_samples"], identity["shard_size"])

    def write_shard(self, index: int) -> dict:
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
        meta = {"settings": self.identity, "provenance": self.provenance, "shard": index, "device": str(self.device),
                "first_id": int(ids_all[0]), "last_id": int(ids_all[-1])}
        stats = {"batches": -(-len(ids_all) // B), "block_passes": block_passes, "fallbacks": total_fallbacks,
                 "device": str(self.device)}
        entry = sh.write_shard(self.out, index, table, meta, stats)
        entry.stats["seconds"] = time.perf_counter() - start  # sampling, encoding and the write
        return asdict(entry)


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

    @property
    def images_per_s(self) -> float:
        return self.samples_written / self.seconds if self.seconds > 0 else 0.0

    def text(self) -> str:
        blocks = ", ".join(f"{p:.1f}" for p in self.block_passes_per_batch)
        return (f"{self.out}: {self.num_samples} samples complete; wrote {self.samples_written} in "
                f"{self.shards_written} shard(s) ({self.shards_skipped} already done) in {self.seconds:.1f}s = "
                f"{self.images_per_s:.1f} images/s\n"
                f"  network passes per batch by block (forward order): [{blocks}]; fallbacks: {self.fallbacks}; "
                f"actors replaced: {self.actor_replacements}")


def _summarize(job: Job, written: int, samples: int, seconds: float, pool: runtime.ActorPool | None) -> GenerateSummary:
    entries = job.manifest.shards
    batches = sum(e.stats.get("batches", 0) for e in entries)
    num_blocks = job.plan.num_blocks
    totals = [sum(e.stats.get("block_passes", [0] * num_blocks)[b] for e in entries) for b in range(num_blocks)]
    return GenerateSummary(job.config.out, job.manifest.num_samples, written, len(entries) - written, samples,
                           seconds, [t / batches if batches else 0.0 for t in totals],
                           sum(e.stats.get("fallbacks", 0) for e in entries),
                           pool.replacements if pool else 0, pool.placements if pool else [])


def generate(cfg: GenerateConfig, progress: bool = True,
             on_shard: Callable[[sh.ShardEntry], None] | None = None) -> GenerateSummary:
    """Run (or resume) a generation; returns the summary. Raises before any work on bad input.

    `on_shard` is called in the driver after each shard is in the manifest (progress for callers)."""
    job = prepare(cfg)
    if not job.pending:
        return _summarize(job, 0, 0, 0.0, None)
    runtime.connect()
    start = time.perf_counter()  # from here: actor start, model loads, sampling, writes
    args = (ray.put(job.model_config), ray.put(job.state_dict), job.spec, job.plan, job.identity,
            job.manifest.provenance, cfg.out)
    bar = tqdm(total=job.manifest.num_samples, initial=job.manifest.rows, unit="img", smoothing=0.1,
               disable=not progress, desc="generate")
    written = samples = 0
    with runtime.ActorPool(ShardWorker, args, cfg.resources, "generate", cfg.start_timeout_s, cfg.max_attempts,
                           num_actors=min(cfg.resources.actors, len(job.pending))) as pool:
        try:
            for _, result in pool.map_unordered(("write_shard", (index,)) for index in job.pending):
                entry = sh.ShardEntry(**result)
                job.manifest.add(entry)
                sh.write_manifest(cfg.out, job.manifest)
                written += 1
                samples += entry.rows
                bar.update(entry.rows)
                if on_shard is not None:
                    on_shard(entry)
        finally:
            bar.close()
        return _summarize(job, written, samples, time.perf_counter() - start, pool)
