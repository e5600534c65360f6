"""Distributed FID, with Inception Score, KID and precision/recall from the same pass: generated images
against a reference.

The samples go through the extractor pool once (`features.FeaturePool`). The reference is either
statistics from a file (`fidelity.stats.load_stats`: the project's `.npz`, a published torchmetrics
state, an ADM/TTUR `.npz`) or images, whose statistics are computed the same way once, cached as
`.npz` with KID's feature subset, and reused. A file made by another extractor or at another image
size is an error, raised before any sample is read where the file says so.

Exact over all samples: FID (mergeable sufficient statistics), IS (one split, and torch-fidelity's 10
seeded splits, each a mergeable sum), precision/recall (every sample's feature row against every
reference image's, block by block in the pool; asked for with `metrics: [..., prc]`, it passes over the
reference's images, since statistics keep no rows). An estimate: KID, torch-fidelity's subset estimator
on a strided subset of `kid_samples` features per side; it needs reference features, so statistics
files without them give FID (and IS) but no KID.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from tarflow.schema import STRICT_FIELDS, JSONForm, SchemaError, check_finite, check_int

from ..config import FidSettings, Resources
from ..fidelity.extractors import check_extractor
from ..fidelity.registry import DINOV2, extractor_info
from ..fidelity.metrics import IS_SPLITS, PRC_NEIGHBORHOOD, f_score, kid
from ..fidelity.paired import JACKKNIFE_GROUPS, FidDifference, paired_fid
from ..fidelity.stats import FIDStats, frechet_distance, load_stats, npz_images
from ..storage import shards as sh
from ..storage.files import resolve, write_below
from .features import EvaluateError, FeaturePool, ImageSource, IMAGE_SUFFIXES, Work, check_shards, compute_stats
from .generate import RunIdentity

__all__ = ["EvaluateError", "FeaturePool", "FIDResult", "FIDResultError", "ImageSource", "ISSplits", "KIDResult",
           "PRCResult", "check_reference", "compare_fid", "evaluate_fid", "reference_stats", "result_name"]
DEFAULT_CACHE_DIR = Path(os.environ.get("TARFLOW_GS_CACHE", "~/.cache/tarflow-gs")).expanduser() / "fid-stats"


def load_reference_file(location: str, settings: FidSettings) -> FIDStats:
    """A statistics file, read with what the settings say about files that do not record their maker."""
    return load_stats(location, settings.reference_extractor, settings.reference_image_size)


def _cache_path(source: ImageSource, settings: FidSettings, image_size, cache_dir: Path) -> Path:
    """Cache file keyed by everything that made the statistics (as StyleGAN2-ADA keys its cache)."""
    key = {"source": source.location, "kind": source.kind, "extractor": settings.extractor,
           "weights": settings.weights, "image_size": list(image_size), "kid_samples": settings.kid_samples,
           "spatial": "sfid" in settings.metrics}
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
    if "fd-dinov2" in settings.metrics:
        check_extractor(DINOV2, settings.dinov2_weights)
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
        check_finite(self.kid_std, "kid_std", error=FIDResultError)
        check_int(self.kid_subsets, "kid_subsets", error=FIDResultError)
        if len(self.kid_features) != 2:
            raise FIDResultError("two counts, samples and reference", "kid_features", self.kid_features)
        check_int(self.kid_subset_size, "kid_subset_size", low=2, high=min(self.kid_features), error=FIDResultError)


@dataclass
class ISSplits:
    """The Inception Score as papers report it: mean and std (np.std) over torch-fidelity's seeded splits
    (`fidelity.metrics.is_split`)."""

    mean: float
    std: float
    splits: int

    __pydantic_config__ = STRICT_FIELDS

    def __post_init__(self):
        check_finite(self.mean, "mean", strict=True, error=FIDResultError)
        check_finite(self.std, "std", error=FIDResultError)
        check_int(self.splits, "splits", low=2, error=FIDResultError)


@dataclass
class PRCResult:
    """Precision and recall (Kynkäänniemi et al. 2019; torch-fidelity's, with the samples as its input1) over
    every sample and reference image, and their F-score."""

    precision: float  # share of samples inside the reference images' k-NN manifold
    recall: float  # share of reference images inside the samples'
    f_score: float
    k: int
    features: list[int]  # (samples, reference images)

    __pydantic_config__ = STRICT_FIELDS

    def __post_init__(self):
        for name in ("precision", "recall", "f_score"):
            if not 0 <= getattr(self, name) <= 1:
                raise FIDResultError("a share, in [0, 1]", name, getattr(self, name))
        check_int(self.k, "k", error=FIDResultError)
        if len(self.features) != 2 or min(self.features) <= self.k:
            raise FIDResultError(f"two counts, samples and reference images, each more than k={self.k}", "features",
                                 self.features)


@dataclass
class FIDResult(JSONForm):
    """FID and what came with it from the same pass; IS, KID, precision/recall are None where not asked for or
    where they cannot be had (then a note says why).
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
    notes: list[str] = field(default_factory=list)  # why a metric asked for is missing
    settings: dict = field(default_factory=dict)
    placements: list[dict] = field(default_factory=list)  # where each extractor actor ran
    inception_score_splits: ISSplits | None = None  # torch-fidelity's 10 seeded splits, as papers report
    precision_recall: PRCResult | None = None
    sfid: float | None = None  # ADM's spatial FID
    fd_dinov2: float | None = None  # the Frechet distance in DINOv2 ViT-L/14 features, over the same images

    __pydantic_config__ = STRICT_FIELDS
    json_name, json_error = "FID result", FIDResultError

    def __post_init__(self):
        check_int(self.sample_count, "sample_count", error=FIDResultError)
        check_int(self.reference_count, "reference_count", optional=True, error=FIDResultError)
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise FIDResultError("(height, width), each >= 1", "image_size", self.image_size)
        check_finite(self.seconds, "seconds", error=FIDResultError)
        for name in ("sfid", "fd_dinov2"):  # distances
            check_finite(getattr(self, name), name, optional=True, error=FIDResultError)
        check_finite(self.inception_score, "inception_score", strict=True, optional=True, error=FIDResultError)

    def values(self) -> dict[str, float]:
        """Every metric given besides FID, by its name in `fidelity.metrics.BETTER_HIGHER`."""
        out = {"sfid": self.sfid, "fd_dinov2": self.fd_dinov2, "is": self.inception_score,
               "is_10": self.inception_score_splits and self.inception_score_splits.mean,
               "kid": self.kid and self.kid.kid_mean}
        if self.precision_recall is not None:
            out.update(precision=self.precision_recall.precision, recall=self.precision_recall.recall,
                       f_score=self.precision_recall.f_score)
        return {name: value for name, value in out.items() if value is not None}

    def text(self) -> str:
        """The metric lines: FID, then the others where they were had, then why the others were not."""
        count = "?" if self.reference_count is None else self.reference_count
        lines = [f"FID: {self.fid:.4f}  ({self.sample_count} samples vs {count} reference images, extractor "
                 f"{self.extractor}, {self.image_size[0]}x{self.image_size[1]}, {self.seconds:.1f}s)"]
        if self.sfid is not None:
            lines.append(f"sFID: {self.sfid:.4f}  (ADM's spatial features: mixed_6/conv, 7 channels, 2023-d)")
        if self.fd_dinov2 is not None:
            lines.append(f"FD-DINOv2: {self.fd_dinov2:.4f}  (DINOv2 ViT-L/14 class token, torch-fidelity's "
                         "preprocessing, same images)")
        if self.inception_score is not None:
            lines.append(f"IS: {self.inception_score:.4f}  (all samples, one split)")
        if self.inception_score_splits is not None:
            m = self.inception_score_splits
            lines.append(f"IS: {m.mean:.4f} +- {m.std:.4f}  ({m.splits} splits, torch-fidelity's seeded shuffle)")
        if self.precision_recall is not None:
            r = self.precision_recall
            lines.append(f"precision: {r.precision:.4f}  recall: {r.recall:.4f}  F: {r.f_score:.4f}  (k = {r.k}, "
                         f"{r.features[0]} samples vs {r.features[1]} reference images, exact)")
        if self.kid is not None:
            k = self.kid
            lines.append(f"KID: {k.kid_mean:.6f} +- {k.kid_std:.6f}  ({k.kid_subsets} subsets of {k.kid_subset_size} "
                         f"from {k.kid_features[0]} sample and {k.kid_features[1]} reference features)")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


# each metric besides FID: its value, or None with a note saying why it cannot be had

def _precision_recall(pool: FeaturePool, passed, ref_pass, reference: str, notes: list[str]) -> PRCResult | None:
    if ref_pass is None:
        notes.append(f"no precision/recall: the reference {reference} is statistics (mu and sigma) without images (an "
                     "ADM batch's arr_0), which keep no image's features; give the reference images")
        return None
    if min(passed.features.count, ref_pass.features.count) <= PRC_NEIGHBORHOOD:
        notes.append(f"no precision/recall: k = {PRC_NEIGHBORHOOD} needs more than {PRC_NEIGHBORHOOD} images on "
                     "each side")
        return None
    precision, recall = pool.precision_recall(passed, ref_pass)
    return PRCResult(precision, recall, f_score(precision, recall), PRC_NEIGHBORHOOD,
                     [passed.features.count, ref_pass.features.count])


def _sfid(sample_stats: FIDStats, ref_stats: FIDStats, settings: FidSettings, ref_path: str,
          notes: list[str]) -> float | None:
    if not extractor_info(settings.extractor).spatial:
        notes.append(f"no sFID: extractor {settings.extractor} gives no spatial features (ADM's mixed_6/conv); "
                     "inception-v3-compat does")
        return None
    if ref_stats.mu_s is None:
        notes.append(f"no sFID: the reference statistics {ref_path} hold no spatial statistics (mu_s, sigma_s)")
        return None
    return frechet_distance(sample_stats, ref_stats, spatial=True)


def _inception_score(passed, settings: FidSettings, notes: list[str]) -> tuple[float | None, tuple | None]:
    if passed.isc is None:
        notes.append(f"no Inception Score: extractor {settings.extractor} has no trained class logits here")
        return None, None
    splits = passed.isc.split_scores()
    if splits is None:
        notes.append(f"no {IS_SPLITS}-split Inception Score: fewer than {IS_SPLITS} samples")
    return passed.isc.score(), splits


def _kid(passed, ref_stats: FIDStats, settings: FidSettings, ref_path: str | None,
         notes: list[str]) -> KIDResult | None:
    if settings.kid_samples == 0:
        notes.append("no KID: fid.kid_samples is 0")
    elif ref_stats.kid is None or len(ref_stats.kid.index) < 2:
        notes.append(f"no KID: the reference statistics {ref_path} hold no features (only FID's mu and sigma)")
    elif len(passed.kid.index) < 2:
        notes.append("no KID: fewer than 2 samples")
    else:
        return KIDResult(**kid(passed.kid.features, ref_stats.kid.features))
    return None


def _fd_dinov2(work: Work, ref_source: ImageSource, settings: FidSettings, resources: Resources,
               progress: bool | None, notes: list[str]) -> float | None:
    """FD-DINOv2 of the samples against the reference's images: a second pass, in a pool of DINOv2 actors (the
    main pass's extractor is another network, or its distance would be this one). None, with a note, where the
    reference has no images (mu-sigma statistics are another network's features)."""
    if settings.extractor == DINOV2:
        notes.append(f"FD-DINOv2 is the FID above (extractor {DINOV2})")
        return None
    if ref_source.kind == "stats":
        if not (ref_source.location.endswith(".npz") and npz_images(ref_source.location)):
            notes.append(f"no FD-DINOv2: the reference {ref_source.location} has no images (statistics are in "
                         "another network's features); give its images, or an ADM batch with arr_0")
            return None
        ref_source = Work.of(ref_source)  # an ADM batch's arr_0
    dinov2 = settings.model_copy(update={"extractor": DINOV2, "weights": settings.dinov2_weights, "metrics": ["fid"]})
    with FeaturePool(dinov2, resources, progress) as pool:
        samples, description = pool.run(work)
        stats = samples.fid_stats(DINOV2, description)
        reference, ref_description = pool.run(ref_source, stats.image_size)
        return frechet_distance(stats, reference.fid_stats(DINOV2, ref_description))


def result_name(extractor: str) -> str:
    return f"_fid-{extractor}.json"  # '_' keeps Parquet readers of the shard directory from parsing it


def evaluate_fid(samples: str, reference: str, settings: FidSettings = FidSettings(),
                 resources: Resources = Resources(), cache_dir: Path | str | None = DEFAULT_CACHE_DIR,
                 write_result: bool = True, progress: bool | None = False) -> FIDResult:
    """FID and the other metrics `settings.metrics` names of `samples` (shards, folder or dataset) against
    `reference` (any source or a statistics file); see the module docstring for which are exact.

    With `write_result`, the result JSON goes next to the shards (`_fid-<extractor>.json` in the
    shard directory or URI, or in the image folder)."""
    start = time.perf_counter()
    source = ImageSource.parse(samples)
    if source.kind == "stats":
        raise EvaluateError(f"--samples {samples!r} is a statistics file; samples must be images (shards or a folder)")
    # every input checked before any sample is read; a statistics file is read once, here
    given, where = check_reference(reference, settings), f"reference statistics {reference}"
    ref_source = ImageSource.parse(reference)
    work = Work.of(source)  # a bad manifest or an empty folder: said before Ray starts
    want, notes = set(settings.metrics), []
    with FeaturePool(settings, resources, progress) as pool:
        passed, description = pool.run(work)
        sample_stats = passed.fid_stats(settings.extractor, description)
        ref_pass = None
        if given is not None:
            given.check_comparable(settings.extractor, sample_stats.image_size, where)
            ref_stats, ref_path = given, ref_source.location
            if "prc" in want and ref_source.location.endswith(".npz") and npz_images(ref_source.location):
                ref_pass, _ = pool.run(Work.of(ref_source), sample_stats.image_size)  # an ADM batch's arr_0
        elif "prc" in want:  # precision/recall need the reference's rows: a pass over its images, not a cache
            ref_pass, ref_description = pool.run(ref_source, sample_stats.image_size)
            ref_stats, ref_path = ref_pass.fid_stats(settings.extractor, ref_description), None
        else:
            ref_stats, ref_path = reference_stats(reference, settings, sample_stats.image_size, cache_dir, pool)
        prc = _precision_recall(pool, passed, ref_pass, reference, notes) if "prc" in want else None
        placements = pool.pool.placements
    fd_dinov2 = _fd_dinov2(work, ref_source, settings, resources, progress, notes) if "fd-dinov2" in want else None
    sfid = _sfid(sample_stats, ref_stats, settings, ref_path or reference, notes) if "sfid" in want else None
    isc, isc_splits = _inception_score(passed, settings, notes) if "is" in want else (None, None)
    kid_result = _kid(passed, ref_stats, settings, ref_path, notes) if "kid" in want else None
    result = FIDResult(frechet_distance(sample_stats, ref_stats), settings.extractor, samples, sample_stats.count,
                       reference, ref_stats.count, ref_path, list(sample_stats.image_size),
                       time.perf_counter() - start, isc, kid_result, notes,
                       {**settings.model_dump(), **resources.model_dump()}, placements,
                       None if isc_splits is None else ISSplits(*isc_splits, IS_SPLITS), prc, sfid, fd_dinov2)
    if write_result and source.kind in ("shards", "folder"):
        fs, base = resolve(source.location)
        write_below(fs, base, result_name(settings.extractor), result.to_json().encode())
    return result


def check_same_ids(plan_samples: str, sequential_samples: str) -> sh.Manifest:
    """The plan's manifest, once both sets are complete and drawn alike but for the plan: the same model, spec
    (seed, labels), sample count and numerics (`RunIdentity.difference`), so sample id i holds the same noise
    and label in both."""
    plan_m, seq_m = check_shards(plan_samples), check_shards(sequential_samples)
    for where, m in ((plan_samples, plan_m), (sequential_samples, seq_m)):
        if not m.complete:
            raise EvaluateError(f"{where} is not complete ({len(m.shards)} of {m.num_shards} shards): finish it first")
    plan_id = RunIdentity.from_settings(plan_m.settings, plan_samples)
    seq_id = RunIdentity.from_settings(seq_m.settings, sequential_samples)
    differ = plan_id.difference(seq_id.model_copy(update={"plan_hash": plan_id.plan_hash}))
    if differ:
        raise EvaluateError(f"{plan_samples} ('there') and {sequential_samples} ('now') are not the same sample ids "
                            f"drawn two ways: {differ}; FIDs of other noise or labels cannot be paired")
    return plan_m


def compare_fid(plan_samples: str, sequential_samples: str, reference: str, settings: FidSettings = FidSettings(),
                resources: Resources = Resources(), groups: int = JACKKNIFE_GROUPS,
                cache_dir: Path | str | None = DEFAULT_CACHE_DIR, progress: bool | None = False) -> FidDifference:
    """FID of a plan's sample set and of the sequential one over the same ids (`check_same_ids`), with their
    jackknife errors and the paired error of the difference (`fidelity.paired`), from one pool's passes."""
    groups = min(groups, check_same_ids(plan_samples, sequential_samples).num_samples)  # no empty group
    check_reference(reference, settings)  # before any image is read
    with FeaturePool(settings, resources, progress, groups=groups) as pool:
        plan_pass, _ = pool.run(ImageSource("shards", plan_samples))
        seq_pass, _ = pool.run(ImageSource("shards", sequential_samples), plan_pass.size)
        ref_stats, _ = reference_stats(reference, settings, plan_pass.size, cache_dir, pool)
    return paired_fid(plan_pass.groups, seq_pass.groups, ref_stats, plan_pass.size)
