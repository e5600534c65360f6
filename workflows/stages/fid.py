"""Distributed FID, with Inception Score and KID from the same pass: generated images against a reference.

The samples go through the extractor pool once (`features.FeaturePool`). The reference is either
statistics from a file (`fidelity.stats.load_stats`: the project's `.npz`, a published torchmetrics
state, an ADM/TTUR `.npz`) or images, whose statistics are computed the same way once, cached as
`.npz` with KID's feature subset, and reused. A file made by another extractor or at another image
size is an error, raised before any sample is read where the file says so.

Exact over all samples: FID (mergeable sufficient statistics) and IS (one split). An estimate: KID,
torch-fidelity's subset estimator on a strided subset of `kid_samples` features per side; it needs
reference features, so statistics files without them give FID (and IS) but no KID.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from tarflow.schema import STRICT_FIELDS, JSONForm, SchemaError

from ..config import FidSettings, Resources
from ..fidelity.extractors import check_extractor
from ..fidelity.metrics import kid
from ..fidelity.stats import FIDStats, frechet_distance, load_stats
from ..storage import shards as sh
from ..storage.files import join, resolve, write_atomic
from .features import EvaluateError, FeaturePool, ImageSource, IMAGE_SUFFIXES, Work, check_shards, compute_stats

__all__ = ["EvaluateError", "FeaturePool", "FIDResult", "FIDResultError", "ImageSource", "KIDResult",
           "check_reference", "evaluate_fid", "reference_stats", "result_name"]
DEFAULT_CACHE_DIR = Path(os.environ.get("TARFLOW_GS_CACHE", "~/.cache/tarflow-gs")).expanduser() / "fid-stats"


def load_reference_file(location: str, settings: FidSettings) -> FIDStats:
    """A statistics file, read with what the settings say about files that do not record their maker."""
    return load_stats(location, settings.reference_extractor, settings.reference_image_size)


def _cache_path(source: ImageSource, settings: FidSettings, image_size, cache_dir: Path) -> Path:
    """Cache file keyed by everything that made the statistics (as StyleGAN2-ADA keys its cache)."""
    key = {"source": source.location, "kind": source.kind, "extractor": settings.extractor,
           "weights": settings.weights, "image_size": list(image_size), "kid_samples": settings.kid_samples}
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
    """(statistics, path of the file they live in) of the reference, computed once and then reused.

    A statistics file is used as given (`load_reference_file`); any other source is looked up in
    `cache_dir` by a key of source, extractor, weights, image size and KID subset size (shards by
    checksum, folders by file sizes and times), computed on a miss (in `pool`, or a pool of its
    own) and saved. `cache_dir=None` computes without saving."""
    source = ImageSource.parse(reference)
    if source.kind == "stats":
        stats = load_reference_file(source.location, settings)
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


def check_reference(reference: str, settings: FidSettings, image_size: int | None = None) -> FIDStats | None:
    """Raise now, before hours of generation or of the samples' pass, where the FID stage would fail on its
    inputs: extractor weights missing or not the extractor's, a reference that is no source, statistics
    unreadable, malformed, not finite, from another extractor or of its dimension or (given the samples'
    `image_size`) of other-sized images, a shard set that is incomplete or lacks a listed shard. Returns
    the statistics a statistics file holds."""
    check_extractor(settings.extractor, settings.weights)
    source = ImageSource.parse(reference)
    if source.kind == "stats":
        stats = load_reference_file(source.location, settings)
        where = f"reference statistics {reference}"
        if image_size is None:
            stats.check_extractor(settings.extractor, where)
        else:
            stats.check_comparable(settings.extractor, (image_size, image_size), where)
        return stats
    if source.kind == "shards":
        check_shards(source.location)
    return None


class FIDResultError(SchemaError):
    """A FID result file that is not one (a field missing or out of range)."""


def _check(rule: bool, text: str) -> None:
    if not rule:
        raise FIDResultError(text)


@dataclass
class KIDResult:
    """torch-fidelity's KID estimate over `kid_subsets` subsets of `kid_subset_size` of the kept features."""

    kid_mean: float  # an unbiased estimate: it can be below 0 for sets drawn alike
    kid_std: float
    kid_subset_size: int
    kid_subsets: int
    kid_features: list[int]  # kept per side: (samples, reference)

    __pydantic_config__ = STRICT_FIELDS

    def __post_init__(self):
        _check(self.kid_std >= 0, f"kid_std={self.kid_std!r}: must be >= 0")
        _check(self.kid_subsets >= 1, f"kid_subsets={self.kid_subsets!r}: must be >= 1")
        _check(len(self.kid_features) == 2, f"kid_features={self.kid_features!r}: two counts, samples and reference")
        _check(2 <= self.kid_subset_size <= min(self.kid_features), f"kid_subset_size={self.kid_subset_size!r}: "
               f"must be in [2, {min(self.kid_features)}] (the fewer features kept of a side)")


@dataclass
class FIDResult(JSONForm):
    """FID and what came with it from the same pass; IS and KID are None where they cannot be had.
    What `fid` writes next to the samples and the pipeline's FID stage keeps; `text` is how every
    command prints it."""

    fid: float  # finite; torch-fidelity's formula can land a hair below 0 for identical statistics
    extractor: str
    samples: str
    sample_count: int
    reference: str
    reference_count: int | None  # None: statistics that do not say (ADM / TTUR)
    reference_stats: str | None
    image_size: list[int]  # (H, W)
    seconds: float
    inception_score: float | None = None  # exact, one split over all samples; None: no class logits
    kid: KIDResult | None = None
    notes: list[str] = field(default_factory=list)  # why a metric is missing
    settings: dict = field(default_factory=dict)
    placements: list[dict] = field(default_factory=list)  # where each extractor actor ran

    __pydantic_config__ = STRICT_FIELDS
    json_name, json_error = "FID result", FIDResultError

    def __post_init__(self):
        _check(self.sample_count >= 1, f"sample_count={self.sample_count!r}: must be >= 1")
        _check(self.reference_count is None or self.reference_count >= 1,
               f"reference_count={self.reference_count!r}: must be >= 1 or null")
        _check(len(self.image_size) == 2 and min(self.image_size) >= 1,
               f"image_size={self.image_size!r}: (height, width), each >= 1")
        _check(self.seconds >= 0, f"seconds={self.seconds!r}: must be >= 0")
        _check(self.inception_score is None or self.inception_score > 0,
               f"inception_score={self.inception_score!r}: an exponential, > 0, or null")

    def text(self) -> str:
        """The metric lines: FID, then IS and KID where they were had, then why the others were not."""
        count = "?" if self.reference_count is None else self.reference_count
        lines = [f"FID: {self.fid:.4f}  ({self.sample_count} samples vs {count} reference images, extractor "
                 f"{self.extractor}, {self.image_size[0]}x{self.image_size[1]}, {self.seconds:.1f}s)"]
        if self.inception_score is not None:
            lines.append(f"IS: {self.inception_score:.4f}  (all samples, one split)")
        if self.kid is not None:
            k = self.kid
            lines.append(f"KID: {k.kid_mean:.6f} +- {k.kid_std:.6f}  ({k.kid_subsets} subsets of {k.kid_subset_size} "
                         f"from {k.kid_features[0]} sample and {k.kid_features[1]} reference features)")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def result_name(extractor: str) -> str:
    return f"_fid-{extractor}.json"  # '_' keeps Parquet readers of the shard directory from parsing it


def evaluate_fid(samples: str, reference: str, settings: FidSettings = FidSettings(),
                 resources: Resources = Resources(), cache_dir: Path | str | None = DEFAULT_CACHE_DIR,
                 write_result: bool = True, progress: bool | None = False) -> FIDResult:
    """FID, IS and KID of `samples` (shards, folder or dataset) against `reference` (any source or a
    statistics file); see the module docstring for which are exact.

    With `write_result`, the result JSON goes next to the shards (`_fid-<extractor>.json` in the
    shard directory or URI, or in the image folder)."""
    start = time.perf_counter()
    source = ImageSource.parse(samples)
    if source.kind == "stats":
        raise EvaluateError(f"--samples {samples!r} is a statistics file; samples must be images (shards or a folder)")
    # every input checked before any sample is read; a statistics file is read once, here
    given, where = check_reference(reference, settings), f"reference statistics {reference}"
    ref_source = ImageSource.parse(reference)
    work = Work.of(source, None, settings.kid_samples)  # a bad manifest or an empty folder: said before Ray starts
    with FeaturePool(settings, resources, progress) as pool:
        passed, description = pool.run(work)
        sample_stats = passed.fid_stats(settings.extractor, description)
        if given is None:
            ref_stats, ref_path = reference_stats(reference, settings, sample_stats.image_size, cache_dir, pool)
        else:
            given.check_comparable(settings.extractor, sample_stats.image_size, where)
            ref_stats, ref_path = given, ref_source.location
        placements = pool.pool.placements
    notes, kid_result = [], None
    if passed.isc is None:
        notes.append(f"no Inception Score: extractor {settings.extractor} has no trained class logits here")
    if settings.kid_samples == 0:
        notes.append("no KID: fid.kid_samples is 0")
    elif ref_stats.kid is None or len(ref_stats.kid.index) < 2:
        notes.append(f"no KID: the reference statistics {ref_path} hold no features (only FID's mu and sigma)")
    elif len(passed.kid.index) < 2:
        notes.append("no KID: fewer than 2 samples")
    else:
        kid_result = KIDResult(**kid(passed.kid.features, ref_stats.kid.features))
    result = FIDResult(frechet_distance(sample_stats, ref_stats), settings.extractor, samples, sample_stats.count,
                       reference, ref_stats.count, ref_path, list(sample_stats.image_size),
                       time.perf_counter() - start, None if passed.isc is None else passed.isc.score(), kid_result,
                       notes, {**settings.model_dump(), **resources.model_dump()}, placements)
    if write_result and source.kind in ("shards", "folder"):
        fs, base = resolve(source.location)
        write_atomic(fs, base, result_name(settings.extractor), result.to_json().encode())
    return result
