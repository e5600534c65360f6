"""The generate stage: a pool of Ray actors samples shards of images and streams them to Parquet.

Work is cut into shards of `shard_size` consecutive sample ids and each shard into
batches of `batch_size`; the cut depends on the settings alone, and sample i's noise
on (seed, i) and its label on the label policy and i, so images do not depend on how
many actors run or which one takes a shard. Each actor loads the model once (Ray's
batch-inference pattern) and writes whole shards itself; the driver only hands out
shard indices and records finished shards in the manifest, so its memory does not
grow with the number of samples.

An actor that dies mid-shard (killed, out of memory) is replaced and the shard goes
back to the queue; a shard is renamed into place only when complete, so every id
ends up exactly once. Re-running the same command skips the shards in the manifest.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata as importlib_metadata
from typing import Callable

import numpy as np
import pyarrow.fs as pafs
import ray
import torch
from tqdm import tqdm

from tarflow import Guidance, Model, ModelConfig, Plan, load_checkpoint, model_hash, sample
from tarflow.denoise import denoise
from tarflow.noise import sample_noise

from . import shards as sh

log = logging.getLogger(__name__)

# Fields that decide the images (or the shard layout): a resumed run must match them all.
IDENTITY_FIELDS = ("model_hash", "plan_hash", "num_samples", "seed", "labels", "guidance", "attn_temp",
                   "annealed_guidance", "guide_what", "denoise", "noise_std", "batch_size", "shard_size",
                   "image_shape")


class GenerateError(RuntimeError):
    """Generation cannot start (bad settings, output in use by another run) or could not finish."""


@dataclass
class GenerateConfig:
    """One generation run. `labels`: "uniform" (cycle through all classes, so each class gets
    num_samples / num_classes samples), "none" (unconditional, label -1), or comma-separated
    class ids to cycle through; None picks "uniform" for class-conditional models, else "none"."""

    checkpoint: str
    out: str
    num_samples: int
    seed: int = 0
    plan: str | None = None
    in_channels: int = 3
    labels: str | None = None
    guidance: float = 0.0
    attn_temp: float = 1.0
    annealed_guidance: bool = False
    guide_what: str = "ab"
    denoise: float = 0.0
    noise_std: float | None = None
    batch_size: int = 16
    shard_size: int = 1024
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float | None = None
    max_attempts: int = 3
    start_timeout_s: float = 300.0

    def validate(self) -> "GenerateConfig":
        for name in ("num_samples", "batch_size", "shard_size", "actors", "max_attempts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: must be a positive integer")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r}: must be a non-negative integer")
        if self.gpus_per_actor < 0:
            raise ValueError(f"gpus_per_actor={self.gpus_per_actor!r}: must be >= 0")
        if self.cpus_per_actor is not None and self.cpus_per_actor <= 0:
            raise ValueError(f"cpus_per_actor={self.cpus_per_actor!r}: must be > 0 (or unset to share the free CPUs)")
        if not (self.denoise >= 0 and math.isfinite(self.denoise)):
            raise ValueError(f"denoise={self.denoise!r}: must be a finite number >= 0 (0 = off)")
        if self.noise_std is not None and not self.noise_std >= 0:
            raise ValueError(f"noise_std={self.noise_std!r}: must be >= 0")
        if self.guidance < 0:
            raise ValueError(f"guidance={self.guidance!r}: must be >= 0 (0 = off)")
        Guidance(self.guidance, self.attn_temp, self.annealed_guidance, self.guide_what)
        parse_labels(self.labels) if self.labels is not None else None
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "GenerateConfig":
        d = json.loads(text)
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"generate config has unknown field(s) {unknown}")
        return cls(**d).validate()


def parse_labels(spec: str) -> str | list[int]:
    """"uniform" | "none" | [class ids] from a --labels value."""
    spec = spec.strip().lower()
    if spec in ("uniform", "none"):
        return spec
    try:
        classes = [int(c) for c in spec.split(",") if c.strip()]
    except ValueError:
        classes = []
    if not classes or min(classes) < 0:
        raise ValueError(f"labels={spec!r}: allowed values are 'uniform', 'none', or comma-separated class ids >= 0")
    return classes


def labels_for(ids, policy: str | list[int], num_classes: int) -> np.ndarray:
    """int64 labels of sample ids under a policy (-1 = unconditional)."""
    ids = np.asarray(ids, np.int64)
    if policy == "none":
        return np.full(len(ids), -1, np.int64)
    classes = np.arange(num_classes) if policy == "uniform" else np.asarray(policy, np.int64)
    return classes[ids % len(classes)]


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
    """What the driver resolved before any work: settings, model weights, plan, pending shards."""

    config: GenerateConfig
    settings: dict
    plan: Plan
    model_config: dict
    state_dict: dict
    manifest: sh.Manifest
    pending: list[int]


def _describe_difference(old: dict, new: dict) -> str:
    diffs = [f"{k}={old.get(k)!r} there vs {new.get(k)!r} now" for k in IDENTITY_FIELDS if old.get(k) != new.get(k)]
    return "; ".join(diffs)


def prepare(cfg: GenerateConfig) -> Job:
    """Check every input and the output before any sampling; returns what the actors need.

    Fails fast on a missing/corrupt checkpoint, a plan for another model, bad labels or
    guidance, an unwritable output, or an output holding a run with other settings."""
    cfg.validate()
    model, provenance = load_checkpoint(cfg.checkpoint, in_channels=cfg.in_channels, with_metadata=True)
    mhash = model_hash(model)
    T = model.num_tokens
    plan = Plan.load(cfg.plan) if cfg.plan else Plan.sequential(len(model.blocks), T)
    plan.check_model(len(model.blocks), T, mhash)
    num_classes = model.config.num_classes
    policy = parse_labels(cfg.labels or ("uniform" if num_classes else "none"))
    if policy != "none" and not num_classes:
        raise ValueError(f"labels={cfg.labels!r}: the model is unconditional (num_classes=0); use 'none'")
    if isinstance(policy, list) and max(policy) >= num_classes:
        raise ValueError(f"labels={cfg.labels!r}: class {max(policy)} out of range, the model has {num_classes} classes")
    if cfg.guidance > 0 and not num_classes:
        raise ValueError(f"guidance={cfg.guidance}: classifier-free guidance needs a class-conditional model")
    noise_std = cfg.noise_std if cfg.noise_std is not None else provenance.get("noise_std")
    if cfg.denoise > 0 and noise_std is None:
        raise ValueError(f"denoise={cfg.denoise}: {cfg.checkpoint} does not record the training noise_std "
                         "that denoising needs; pass noise_std (--noise-std)")
    c = model.config
    settings = {
        "model_hash": mhash, "plan_hash": plan.fingerprint(), "num_samples": cfg.num_samples, "seed": cfg.seed,
        "labels": policy, "guidance": cfg.guidance, "attn_temp": cfg.attn_temp,
        "annealed_guidance": cfg.annealed_guidance, "guide_what": cfg.guide_what, "denoise": cfg.denoise,
        "noise_std": noise_std if cfg.denoise > 0 else None,
        "batch_size": cfg.batch_size, "shard_size": cfg.shard_size,
        "image_shape": [c.in_channels, c.img_size, c.img_size], "num_classes": num_classes,
    }
    manifest = _open_output(cfg, settings, plan)
    done = {e.index for e in manifest.shards}
    pending = [i for i in range(manifest.num_shards) if i not in done]
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return Job(cfg, settings, plan, c.to_dict(), state, manifest, pending)


def _open_output(cfg: GenerateConfig, settings: dict, plan: Plan) -> sh.Manifest:
    """Create the output with a fresh manifest, or check an existing one matches and drop lost shards."""
    fs, base = sh.resolve(cfg.out)
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
        manifest = sh.Manifest(settings, cfg.num_samples, cfg.shard_size)
    else:
        manifest = sh.read_manifest(cfg.out)
        diff = _describe_difference(manifest.settings, settings)
        if diff:
            raise GenerateError(f"output {cfg.out} already holds a run with different settings ({diff}); "
                                "re-run with the original settings to resume, or choose another --out")
        lost = _lost_shards(cfg.out, manifest)
        if lost:
            log.warning("%s: %d listed shard(s) are missing or changed (%s); they will be generated again",
                        cfg.out, len(lost), ", ".join(e.file for e in lost[:5]))
            manifest.shards = [e for e in manifest.shards if e not in lost]
    manifest.provenance = {"checkpoint": str(cfg.checkpoint), "plan_file": cfg.plan, "plan": plan.to_dict(),
                           "software": software_versions()}
    try:
        sh.write_manifest(cfg.out, manifest)
        sh.remove_temporaries(fs, base)
    except OSError as e:
        raise GenerateError(f"output {cfg.out} is not writable: {e}") from e
    return manifest


def _lost_shards(uri: str, manifest: sh.Manifest) -> list[sh.ShardEntry]:
    fs, base = sh.resolve(uri)
    infos = fs.get_file_info([f"{base.rstrip('/')}/{e.file}" for e in manifest.shards])
    return [e for e, i in zip(manifest.shards, infos) if i.type != pafs.FileType.File or i.size != e.size_bytes]


def sample_batch(model: Model, ids, settings: dict, plan: Plan, device="cpu"):
    """uint8 images (B, H, W, C) and solver stats for sample ids: what one shard batch computes."""
    labels = labels_for(ids, settings["labels"], settings["num_classes"])
    noise = sample_noise(settings["seed"], ids, model.num_tokens, model.token_dim).to(device)
    y = None if settings["labels"] == "none" else torch.as_tensor(labels, device=device)
    out = sample(model, noise, y, plan=plan, guidance=settings["guidance"], attn_temp=settings["attn_temp"],
                 annealed_guidance=settings["annealed_guidance"], guide_what=settings["guide_what"])
    images = out.images
    if settings["denoise"] > 0:
        images = denoise(model, images, y, noise_std=settings["noise_std"], lr_multiplier=settings["denoise"])
    return sh.to_uint8(images.float().cpu()), labels, out.stats


class ShardWorker:
    """Ray actor: holds the model once and writes whole shards (Ray's batch-inference pattern)."""

    def __init__(self, model_config: dict, state_dict: dict, settings: dict, plan: dict, provenance: dict,
                 out: str, torch_threads: int):
        torch.set_num_threads(torch_threads)
        self.device = torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
        model = Model.from_config(ModelConfig(**model_config))
        model.load_state_dict(state_dict)
        self.model = model.eval().to(self.device)
        self.settings, self.plan, self.out = settings, Plan.from_dict(plan), out
        self.provenance = provenance
        self.layout = sh.Manifest(settings, settings["num_samples"], settings["shard_size"])

    def ready(self) -> dict:
        return {"pid": os.getpid(), "device": str(self.device)}

    def write_shard(self, index: int) -> dict:
        ids_all = np.asarray(self.layout.shard_ids(index), np.int64)
        B = self.settings["batch_size"]
        pngs, labels, passes, fallbacks, residual = [], [], [], [], []
        num_blocks = len(self.model.blocks)
        block_passes, total_fallbacks = [0] * num_blocks, 0
        start = time.perf_counter()
        for s in range(0, len(ids_all), B):
            ids = ids_all[s : s + B]
            images, y, stats = sample_batch(self.model, ids, self.settings, self.plan, self.device)
            pngs += [sh.encode_png(im) for im in images]
            labels.append(y)
            per_block = [0] * num_blocks
            for b in stats.blocks:
                per_block[b.block] = b.passes
                block_passes[b.block] += b.passes
            passes += [per_block] * len(ids)
            fallbacks += [stats.fallbacks] * len(ids)
            total_fallbacks += stats.fallbacks
            residual += [max((b.residual for b in stats.blocks), default=0.0)] * len(ids)
        table = sh.shard_table(ids_all, np.concatenate(labels), self.settings["seed"], pngs, passes, fallbacks,
                               residual)
        meta = {"settings": self.settings, **self.provenance, "shard": index, "device": str(self.device),
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


def _summarize(job: Job, written: int, samples: int, seconds: float, replacements: int) -> GenerateSummary:
    entries = job.manifest.shards
    batches = sum(e.stats.get("batches", 0) for e in entries)
    num_blocks = job.plan.num_blocks
    totals = [sum(e.stats.get("block_passes", [0] * num_blocks)[b] for e in entries) for b in range(num_blocks)]
    return GenerateSummary(job.config.out, job.manifest.num_samples, written, len(entries) - written, samples,
                           seconds, [t / batches if batches else 0.0 for t in totals],
                           sum(e.stats.get("fallbacks", 0) for e in entries), replacements)


def _ensure_ray() -> None:
    if not ray.is_initialized():
        # RAY_ADDRESS (set by `ray job submit`) joins that cluster; otherwise a private local one
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False)


def actor_resources(cfg: GenerateConfig) -> tuple[float, float, int]:
    """(num_cpus, num_gpus, torch threads) per actor.

    By default the pool asks for less than the whole cluster, (CPUs / (actors + 1)) each and
    at most one: a pool that claims every CPU deadlocks a small machine as soon as anything
    else (a pipeline task, a Ray Data read) needs one (ray#44687). The request only places
    actors; torch threads follow the node's cores shared among the actors."""
    total = ray.cluster_resources().get("CPU", 0.0)
    node_cpus = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=total)
    if cfg.cpus_per_actor is not None:
        return cfg.cpus_per_actor, cfg.gpus_per_actor, max(1, int(cfg.cpus_per_actor))
    if total <= 0:
        raise GenerateError("the Ray cluster has no CPUs for the actors")
    cpus = math.floor(min(1.0, total / (cfg.actors + 1)) * 1000) / 1000
    threads = 1 if cfg.gpus_per_actor > 0 else max(1, int(node_cpus // cfg.actors))
    return cpus, cfg.gpus_per_actor, threads


def generate(cfg: GenerateConfig, progress: bool = True,
             on_shard: Callable[[sh.ShardEntry], None] | None = None) -> GenerateSummary:
    """Run (or resume) a generation; returns the summary. Raises before any work on bad input.

    `on_shard` is called in the driver after each shard is in the manifest (progress for callers)."""
    job = prepare(cfg)
    if not job.pending:
        return _summarize(job, 0, 0, 0.0, 0)
    _ensure_ray()
    start = time.perf_counter()  # from here: actor start, model loads, sampling, writes
    num_cpus, num_gpus, threads = actor_resources(cfg)
    worker_cls = ray.remote(ShardWorker).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)
    model_ref, state_ref = ray.put(job.model_config), ray.put(job.state_dict)
    provenance = {"provenance": job.manifest.provenance}

    def new_actor():
        return worker_cls.remote(model_ref, state_ref, job.settings, job.plan.to_dict(), provenance, cfg.out, threads)

    actors = [new_actor() for _ in range(min(cfg.actors, len(job.pending)))]
    bar = tqdm(total=job.manifest.num_samples, initial=job.manifest.rows, unit="img", smoothing=0.1,
               disable=not progress, desc="generate")
    written = samples = replacements = 0
    try:
        ready, waiting = ray.wait([a.ready.remote() for a in actors], num_returns=len(actors),
                                  timeout=cfg.start_timeout_s)
        if waiting:
            raise GenerateError(f"{len(waiting)} of {len(actors)} actors did not start within {cfg.start_timeout_s:.0f}s: "
                                f"the cluster cannot place {num_cpus} CPU + {num_gpus} GPU per actor "
                                "(lower --actors, --cpus-per-actor or --gpus-per-actor)")
        ray.get(ready)
        pending = deque(job.pending)
        attempts: dict[int, int] = {}
        inflight = {}
        for slot, actor in enumerate(actors):
            index = pending.popleft()
            inflight[actor.write_shard.remote(index)] = (slot, index)
        while inflight:
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            slot, index = inflight.pop(ref)
            try:
                entry = sh.ShardEntry(**ray.get(ref))
            except (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError,
                    ray.exceptions.WorkerCrashedError) as e:
                attempts[index] = attempts.get(index, 0) + 1
                if attempts[index] >= cfg.max_attempts:
                    raise GenerateError(f"shard {index} lost its actor {attempts[index]} times (last: "
                                        f"{type(e).__name__}); finished shards are kept in the manifest") from e
                log.warning("actor died on shard %d (%s); replacing it and redoing the shard", index, type(e).__name__)
                ray.kill(actors[slot], no_restart=True)
                actors[slot] = new_actor()
                replacements += 1
                pending.appendleft(index)
            except ray.exceptions.RayTaskError as e:
                ids = job.manifest.shard_ids(index)
                raise GenerateError(f"shard {index} (ids {ids.start}..{ids.stop - 1}) failed: "
                                    f"{type(e.cause).__name__}: {e.cause}; finished shards are kept") from e.cause
            else:
                job.manifest.add(entry)
                sh.write_manifest(cfg.out, job.manifest)
                written += 1
                samples += entry.rows
                bar.update(entry.rows)
                if on_shard is not None:
                    on_shard(entry)
            if pending:
                index = pending.popleft()
                inflight[actors[slot].write_shard.remote(index)] = (slot, index)
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor, no_restart=True)
    return _summarize(job, written, samples, time.perf_counter() - start, replacements)
