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
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import ray
from tqdm import tqdm

from .. import runtime
from ..config import FidSettings, Resources
from ..fidelity.extractors import build_extractor, check_extractor, extract_features
from ..fidelity.stats import FeatureStats, FIDStats, StatsMismatchError, frechet_distance
from ..storage import shards as sh
from ..storage.files import read_bytes, resolve, write_atomic

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


class FeatureWorker(runtime.Worker):
    """Loads the extractor once; turns a unit of images into (FeatureStats, (H, W))."""

    def __init__(self, settings: FidSettings, threads: int):
        super().__init__(threads)
        self.extractor = build_extractor(settings.extractor, settings.weights, str(self.device))
        self.batch_size = settings.batch_size

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
        fs, base = resolve(uri)
        where = f"{uri}/{entry.file}"
        data = read_bytes(fs, f"{base.rstrip('/')}/{entry.file}")
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

    def __init__(self, settings: FidSettings = FidSettings(), resources: Resources = Resources(),
                 progress: bool = False):
        check_extractor(settings.extractor, settings.weights)
        runtime.connect()
        self.settings, self.progress = settings, progress
        self.pool = runtime.ActorPool(FeatureWorker, (settings,), resources, "fid")

    def __enter__(self) -> "FeaturePool":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.close()

    def stats(self, source: ImageSource | str, image_size: tuple[int, int] | None = None) -> FIDStats:
        """FID statistics of one source, merged in the driver as tasks finish.

        `image_size` resizes a dataset to it; other sources must already have it (else an error)."""
        source = ImageSource.parse(source) if isinstance(source, str) else source
        units, description = _units(source, image_size)
        total, size = None, None
        results = self.pool.map_unordered((unit[0], unit[1:]) for unit in units)
        for _, (stats, unit_size) in tqdm(results, total=len(units), disable=not self.progress,
                                          desc=self.settings.extractor):
            if size is not None and unit_size != size:
                raise EvaluateError(f"{description} mixes image sizes {size} and {unit_size}")
            size = unit_size
            total = stats if total is None else total + stats
        if image_size is not None and tuple(size) != tuple(image_size):
            raise StatsMismatchError(f"{description} holds {size[0]}x{size[1]} images, the samples are "
                                     f"{image_size[0]}x{image_size[1]}: compare images of one size")
        return FIDStats.from_features(total, self.settings.extractor, size, description)


def compute_stats(source: ImageSource | str, settings: FidSettings, resources: Resources = Resources(),
                  image_size: tuple[int, int] | None = None) -> FIDStats:
    """FID statistics of one image source with a pool of its own (see `FeaturePool.stats`)."""
    with FeaturePool(settings, resources) as pool:
        return pool.stats(source, image_size)


def _cache_path(source: ImageSource, settings: FidSettings, image_size, cache_dir: Path) -> Path:
    """Cache file keyed by everything that made the statistics (as StyleGAN2-ADA keys its cache)."""
    key = {"source": source.location, "kind": source.kind, "extractor": settings.extractor,
           "weights": settings.weights, "image_size": list(image_size)}
    if source.kind == "shards":
        key["shards"] = [e.sha256 for e in sh.read_manifest(source.location).shards]
    elif source.kind == "folder":
        key["files"] = [(str(p), p.stat().st_size, p.stat().st_mtime_ns)
                        for p in sorted(Path(source.location).rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = Path(source.location.rstrip("/")).name or "reference"
    return cache_dir / f"{name}-{settings.extractor}-{image_size[0]}x{image_size[1]}-{digest}.npz"


def reference_stats(reference: str, settings: FidSettings, image_size: tuple[int, int],
                    cache_dir: Path | str | None = DEFAULT_CACHE_DIR, pool: FeaturePool | None = None,
                    resources: Resources = Resources()) -> tuple[FIDStats, str | None]:
    """(statistics, path of the .npz they live in) of the reference, computed once and then reused.

    A stats .npz is used as given; any other source is looked up in `cache_dir` by a key of
    source, extractor, weights and image size (shards by checksum, folders by file sizes and
    times), computed on a miss (in `pool`, or a pool of its own) and saved. `cache_dir=None`
    computes without saving."""
    source = ImageSource.parse(reference)
    if source.kind == "stats":
        stats = FIDStats.load(source.location)
        stats.check_comparable(settings.extractor, image_size, f"reference statistics {source.location}")
        return stats, source.location
    path = None if cache_dir is None else _cache_path(source, settings, image_size, Path(cache_dir))
    if path is not None and path.is_file():
        stats = FIDStats.load(path)
        stats.check_comparable(settings.extractor, image_size, f"cached reference statistics {path}")
        return stats, str(path)
    stats = pool.stats(source, image_size) if pool is not None else compute_stats(source, settings, resources,
                                                                                  image_size)
    return stats, None if path is None else str(stats.save(path))


def check_reference(reference: str, settings: FidSettings) -> None:
    """Raise now, before hours of generation, where the FID stage would fail on its inputs: extractor
    weights missing, a reference that is no source, statistics unreadable or from another extractor,
    a shard set that is incomplete."""
    check_extractor(settings.extractor, settings.weights)
    source = ImageSource.parse(reference)
    if source.kind == "stats":
        FIDStats.load(source.location).check_extractor(settings.extractor, f"reference statistics {reference}")
    elif source.kind == "shards" and not sh.read_manifest(source.location).complete:
        raise sh.ShardError(f"FID reference {reference} is an incomplete shard set: finish its generation first")


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
    placements: list[dict] = field(default_factory=list)  # where each extractor actor ran

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    def text(self) -> str:
        return (f"FID: {self.fid:.4f}  ({self.sample_count} samples vs {self.reference_count} reference images, "
                f"extractor {self.extractor}, {self.image_size[0]}x{self.image_size[1]}, {self.seconds:.1f}s)")


def result_name(extractor: str) -> str:
    return f"_fid-{extractor}.json"  # '_' keeps Parquet readers of the shard directory from parsing it


def evaluate_fid(samples: str, reference: str, settings: FidSettings = FidSettings(),
                 resources: Resources = Resources(), cache_dir: Path | str | None = DEFAULT_CACHE_DIR,
                 write_result: bool = True, progress: bool = False) -> FIDResult:
    """FID of `samples` (shards, folder or dataset) against `reference` (any source or a stats .npz).

    With `write_result`, the result JSON goes next to the shards (`_fid-<extractor>.json` in the
    shard directory or URI, or in the image folder)."""
    check_extractor(settings.extractor, settings.weights)
    start = time.perf_counter()
    source = ImageSource.parse(samples)
    if source.kind == "stats":
        raise EvaluateError(f"--samples {samples!r} is a statistics file; samples must be images (shards or a folder)")
    ref_source = ImageSource.parse(reference)
    if ref_source.kind == "stats":  # fail on a mismatched extractor before spending time on the samples
        FIDStats.load(ref_source.location).check_extractor(settings.extractor,
                                                           f"reference statistics {ref_source.location}")
    with FeaturePool(settings, resources, progress) as pool:
        sample_stats = pool.stats(source)
        ref_stats, ref_path = reference_stats(reference, settings, sample_stats.image_size, cache_dir, pool)
        placements = pool.pool.placements
    result = FIDResult(frechet_distance(sample_stats, ref_stats), settings.extractor, samples, sample_stats.count,
                       reference, ref_stats.count, ref_path, list(sample_stats.image_size),
                       time.perf_counter() - start, {**settings.model_dump(), **resources.model_dump()}, placements)
    if write_result and source.kind in ("shards", "folder"):
        fs, base = resolve(source.location)
        write_atomic(fs, f"{base.rstrip('/')}/{result_name(settings.extractor)}", result.to_json().encode())
    return result
