"""Distributed FID: generated shards against a reference, with feature extraction in a Ray actor pool.

Each task reduces one unit of images (a shard, a chunk of an image folder or of a dataset) to
`FeatureStats` inside an actor that loaded its extractor once; the driver adds them up as they
arrive, so the driver holds one D x D matrix per task in flight and never the features. A task
is a whole shard rather than a Ray Data batch because a D x D float64 sum per batch (32 MiB at
D = 2048) would cost more to ship than the features it summarises.

Reference statistics are computed the same way once, saved as `.npz` (`FIDStats`) and reused;
a cached or given file made by another extractor or at another image size is an error.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import ray
from ray.util import ActorPool
from tqdm import tqdm

from . import shards as sh
from .extractors import DEFAULT_EXTRACTOR, build_extractor, check_extractor, extract_features
from .fid_stats import FeatureStats, FIDStats, StatsMismatchError, frechet_distance

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_CACHE_DIR = Path(os.environ.get("TARFLOW_GS_CACHE", "~/.cache/tarflow-gs")).expanduser() / "fid-stats"
CHUNK_IMAGES = 1024  # images per task for folders and datasets (shards are one task each)


class EvaluateError(ValueError):
    """An evaluation that cannot run as asked (unknown source, empty set, mixed image sizes)."""


@dataclass(frozen=True)
class ImageSource:
    """Where a set of images (or its statistics) comes from."""

    kind: str  # "shards" | "folder" | "dataset" | "stats"
    location: str

    @classmethod
    def parse(cls, spec: str) -> "ImageSource":
        from tarflow.data import BUILTIN_DATASETS

        spec = str(spec)
        if spec.endswith(".npz"):
            return cls("stats", spec)
        if spec in BUILTIN_DATASETS:
            return cls("dataset", spec)
        if "://" in spec and not spec.startswith("file://"):
            return cls("shards", spec)
        path = Path(spec.removeprefix("file://")).expanduser()
        if (path / sh.MANIFEST_NAME).is_file():
            return cls("shards", spec)
        if path.is_dir():
            return cls("folder", str(path))
        raise EvaluateError(f"{spec!r} is neither a shard set (a directory or URI with {sh.MANIFEST_NAME}), an image "
                            f"folder, a dataset name ({', '.join(BUILTIN_DATASETS)}) nor a statistics .npz")


@dataclass
class ExtractConfig:
    """How features are extracted: which network, and the actor pool that runs it."""

    extractor: str = DEFAULT_EXTRACTOR
    weights_path: str | None = None  # inception-v3-compat: torch-fidelity .pth; others: optional override
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float | None = None  # None: a share that leaves room for other work (ray#44687)
    batch_size: int = 200
    progress: bool = False

    def validate(self) -> None:
        check_extractor(self.extractor, self.weights_path)
        for name in ("actors", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be a positive integer")
        if self.gpus_per_actor < 0:
            raise ValueError(f"gpus_per_actor={self.gpus_per_actor!r}: must be >= 0")
        if self.cpus_per_actor is not None and self.cpus_per_actor <= 0:
            raise ValueError(f"cpus_per_actor={self.cpus_per_actor!r}: must be > 0 (or unset)")


class FeatureWorker:
    """Loads the extractor once; turns a unit of images into (FeatureStats, (H, W))."""

    def __init__(self, extractor: str, weights_path: str | None, gpus: float, threads: int, batch_size: int):
        import torch

        torch.set_num_threads(threads)
        self.extractor = build_extractor(extractor, weights_path, "cuda" if gpus > 0 else "cpu")
        self.batch_size = batch_size

    def _reduce(self, batches, where: str) -> tuple[FeatureStats, tuple[int, int]]:
        stats, size = None, None
        for images in batches:
            if size is None:
                size = images.shape[1:3]
            elif images.shape[1:3] != size:
                raise EvaluateError(f"{where} mixes image sizes {size} and {images.shape[1:3]}")
            part = FeatureStats.of(extract_features(self.extractor, images))
            stats = part if stats is None else stats + part
        if stats is None:
            raise EvaluateError(f"{where} holds no images")
        return stats, tuple(int(s) for s in size)

    def _batched(self, images: np.ndarray):
        return (images[i:i + self.batch_size] for i in range(0, len(images), self.batch_size))

    def shard(self, uri: str, entry: dict):
        """One manifest shard, its checksum verified before any image counts."""
        entry = sh.ShardEntry(**entry)
        fs, base = sh.resolve(uri)
        where = f"{uri}/{entry.file}"
        with fs.open_input_stream(f"{base.rstrip('/')}/{entry.file}") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise sh.ShardError(f"shard {where} fails its sha256 check: it is corrupt (re-run generate to redo it)")
        import pyarrow as pa
        import pyarrow.parquet as pq

        pngs = pq.read_table(pa.BufferReader(data), columns=["image"]).column("image").combine_chunks().field("bytes")
        if len(pngs) != entry.rows:
            raise sh.ShardError(f"shard {where} has {len(pngs)} rows, the manifest says {entry.rows}")
        batches = (np.stack([sh.decode_png(b.as_py()) for b in pngs[i:i + self.batch_size]])
                   for i in range(0, len(pngs), self.batch_size))
        return self._reduce(batches, f"shard {where}")

    def files(self, paths: list[str]):
        from PIL import Image

        def load(path):
            with Image.open(path) as img:
                array = np.asarray(img if img.mode in ("L", "RGB") else img.convert("RGB"))
            return array[:, :, None] if array.ndim == 2 else array

        batches = (np.stack([load(p) for p in paths[i:i + self.batch_size]])
                   for i in range(0, len(paths), self.batch_size))
        return self._reduce(batches, f"images {paths[0]}..{paths[-1]}")

    def array(self, images: np.ndarray):
        return self._reduce(self._batched(images), "image array")


def _ensure_ray() -> None:
    if not ray.is_initialized():
        # RAY_ADDRESS (set by `ray job submit`) joins that cluster; otherwise a private local one
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False)


def _actor_resources(cfg: ExtractConfig) -> tuple[float, int]:
    """(num_cpus, torch threads) per actor: by default CPUs / (actors + 1), at most one, so the pool
    never claims every CPU (ray#44687); threads share the node's cores among the actors."""
    node_cpus = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=1.0)
    if cfg.cpus_per_actor is not None:
        return cfg.cpus_per_actor, max(1, int(cfg.cpus_per_actor))
    total = ray.cluster_resources().get("CPU", 0.0)
    cpus = math.floor(min(1.0, total / (cfg.actors + 1)) * 1000) / 1000
    threads = 1 if cfg.gpus_per_actor > 0 else max(1, int(node_cpus // cfg.actors))
    return max(cpus, 0.001), threads


def _units(source: ImageSource, image_size: tuple[int, int] | None) -> tuple[list[tuple], str]:
    """The tasks of one source as (worker method, args) and a description of the images."""
    if source.kind == "shards":
        manifest = sh.read_manifest(source.location)
        if not manifest.complete:
            raise sh.ShardError(f"{source.location} is incomplete: {len(manifest.shards)} of {manifest.num_shards} "
                                "shards; resume generate to finish it before computing FID")
        return [("shard", source.location, asdict(e)) for e in manifest.shards], source.location
    if source.kind == "folder":
        root = Path(source.location)
        paths = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not paths:
            raise EvaluateError(f"image folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return [("files", paths[i:i + CHUNK_IMAGES]) for i in range(0, len(paths), CHUNK_IMAGES)], str(root)
    if source.kind == "dataset":
        from tarflow.data import load_dataset

        size = None if image_size is None else image_size[0]
        images = sh.to_uint8(load_dataset(source.location, image_size=size).images.numpy())
        return [("array", ray.put(images[i:i + CHUNK_IMAGES])) for i in range(0, len(images), CHUNK_IMAGES)], \
            f"{source.location} (all {len(images)} images)"
    raise EvaluateError(f"a {source.kind} source has no images to extract")


class FeaturePool:
    """Extractor actors, started once and used for every image source of an evaluation."""

    def __init__(self, cfg: ExtractConfig):
        cfg.validate()
        _ensure_ray()
        self.cfg = cfg
        num_cpus, threads = _actor_resources(cfg)
        worker_cls = ray.remote(FeatureWorker).options(num_cpus=num_cpus, num_gpus=cfg.gpus_per_actor)
        self.actors = [worker_cls.remote(cfg.extractor, cfg.weights_path, cfg.gpus_per_actor, threads, cfg.batch_size)
                       for _ in range(cfg.actors)]

    def __enter__(self) -> "FeaturePool":
        return self

    def __exit__(self, *exc) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)

    def stats(self, source: ImageSource | str, image_size: tuple[int, int] | None = None) -> FIDStats:
        """FID statistics of one source, merged in the driver as tasks finish.

        `image_size` resizes a dataset to it; other sources must already have it (else an error)."""
        source = ImageSource.parse(source) if isinstance(source, str) else source
        units, description = _units(source, image_size)
        total, size = None, None
        results = ActorPool(self.actors).map_unordered(
            lambda actor, unit: getattr(actor, unit[0]).remote(*unit[1:]), units)
        try:
            for stats, unit_size in tqdm(results, total=len(units), disable=not self.cfg.progress,
                                         desc=self.cfg.extractor):
                if size is not None and unit_size != size:
                    raise EvaluateError(f"{description} mixes image sizes {size} and {unit_size}")
                size = unit_size
                total = stats if total is None else total + stats
        except ray.exceptions.RayTaskError as e:
            raise e.cause from e  # the worker's own error (corrupt shard, unreadable image), not Ray's wrapper
        if image_size is not None and tuple(size) != tuple(image_size):
            raise StatsMismatchError(f"{description} holds {size[0]}x{size[1]} images, the samples are "
                                     f"{image_size[0]}x{image_size[1]}: compare images of one size")
        return FIDStats.from_features(total, self.cfg.extractor, size, description)


def compute_stats(source: ImageSource | str, cfg: ExtractConfig, image_size: tuple[int, int] | None = None) -> FIDStats:
    """FID statistics of one image source with a pool of its own (see `FeaturePool.stats`)."""
    with FeaturePool(cfg) as pool:
        return pool.stats(source, image_size)


def _cache_path(source: ImageSource, cfg: ExtractConfig, image_size, cache_dir: Path) -> Path:
    """Cache file keyed by everything that made the statistics (as StyleGAN2-ADA keys its cache)."""
    key = {"source": source.location, "kind": source.kind, "extractor": cfg.extractor,
           "weights": cfg.weights_path, "image_size": list(image_size)}
    if source.kind == "shards":
        key["shards"] = [e.sha256 for e in sh.read_manifest(source.location).shards]
    elif source.kind == "folder":
        key["files"] = [(str(p), p.stat().st_size, p.stat().st_mtime_ns)
                        for p in sorted(Path(source.location).rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = Path(source.location.rstrip("/")).name or "reference"
    return cache_dir / f"{name}-{cfg.extractor}-{image_size[0]}x{image_size[1]}-{digest}.npz"


def reference_stats(reference: str, cfg: ExtractConfig, image_size: tuple[int, int],
                    cache_dir: Path | str | None = DEFAULT_CACHE_DIR,
                    pool: FeaturePool | None = None) -> tuple[FIDStats, str | None]:
    """(statistics, path of the .npz they live in) of the reference, computed once and then reused.

    A stats .npz is used as given; any other source is looked up in `cache_dir` by a key of
    source, extractor, weights and image size (shards by checksum, folders by file sizes and
    times), computed on a miss (in `pool`, or a pool of its own) and saved. `cache_dir=None`
    computes without saving."""
    source = ImageSource.parse(reference)
    if source.kind == "stats":
        stats = FIDStats.load(source.location)
        stats.check_comparable(cfg.extractor, image_size, f"reference statistics {source.location}")
        return stats, source.location
    path = None if cache_dir is None else _cache_path(source, cfg, image_size, Path(cache_dir))
    if path is not None and path.is_file():
        stats = FIDStats.load(path)
        stats.check_comparable(cfg.extractor, image_size, f"cached reference statistics {path}")
        return stats, str(path)
    stats = pool.stats(source, image_size) if pool is not None else compute_stats(source, cfg, image_size)
    return stats, None if path is None else str(stats.save(path))


@dataclass
class FIDResult:
    fid: float
    extractor: str
    samples: str
    sample_count: int
    reference: str
    reference_count: int
    reference_stats: str | None
    image_size: list[int]
    seconds: float
    settings: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    def text(self) -> str:
        return (f"FID: {self.fid:.4f}  ({self.sample_count} samples vs {self.reference_count} reference images, "
                f"extractor {self.extractor}, {self.image_size[0]}x{self.image_size[1]}, {self.seconds:.1f}s)")


def result_name(extractor: str) -> str:
    return f"_fid-{extractor}.json"  # '_' keeps Parquet readers of the shard directory from parsing it


def evaluate_fid(samples: str, reference: str, cfg: ExtractConfig | None = None,
                 cache_dir: Path | str | None = DEFAULT_CACHE_DIR, write_result: bool = True) -> FIDResult:
    """FID of `samples` (shards, folder or dataset) against `reference` (any source or a stats .npz).

    With `write_result`, the result JSON goes next to the shards (`_fid-<extractor>.json` in the
    shard directory or URI, or in the image folder)."""
    cfg = cfg or ExtractConfig()
    cfg.validate()
    start = time.perf_counter()
    source = ImageSource.parse(samples)
    if source.kind == "stats":
        raise EvaluateError(f"--samples {samples!r} is a statistics file; samples must be images (shards or a folder)")
    ref_source = ImageSource.parse(reference)
    if ref_source.kind == "stats":  # fail on a mismatched extractor before spending time on the samples
        FIDStats.load(ref_source.location).check_extractor(cfg.extractor, f"reference statistics {ref_source.location}")
    with FeaturePool(cfg) as pool:
        sample_stats = pool.stats(source)
        ref_stats, ref_path = reference_stats(reference, cfg, sample_stats.image_size, cache_dir, pool)
    result = FIDResult(frechet_distance(sample_stats, ref_stats), cfg.extractor, samples, sample_stats.count,
                       reference, ref_stats.count, ref_path, list(sample_stats.image_size),
                       time.perf_counter() - start,
                       {"actors": cfg.actors, "gpus_per_actor": cfg.gpus_per_actor, "batch_size": cfg.batch_size,
                        "weights_path": cfg.weights_path})
    if write_result and source.kind in ("shards", "folder"):
        fs, base = sh.resolve(source.location)
        sh.write_atomic(fs, f"{base.rstrip('/')}/{result_name(cfg.extractor)}", result.to_json().encode())
    return result
