"""Mergeable feature statistics for distributed FID, and the files reference statistics come in.

Shaped like StyleGAN2-ADA's `FeatureStats`: a task reduces its images to (count, sum, sum of outer
products) in float64, the driver adds those up, and only then are mu and sigma formed, so no process
ever holds all features. sigma follows torch-fidelity's convention (`np.cov`, divides by n - 1, not
StyleGAN2-ADA's n), and the distance itself is torch-fidelity's `fid_statistics_to_metric`, so a
merged FID equals single-process torch-fidelity on the same images.

Reference files (`load_stats`): the project's `.npz` (mu, sigma, n, extractor, image size, dataset);
the state of a torchmetrics `FrechetInceptionDistance` (`.pth`/`.pt`, as the TarFlow and GS-Jacobi
authors publish theirs: real-feature sum, sum of outer products and count, exactly the sufficient
statistics here; made by torch-fidelity's Inception, at the image size their name carries, e.g.
`afhq_256_fid_stats.pth`); and the ADM / TTUR `.npz` (mu and sigma), whose extractor and image size
the user must state, where ADM's reference batches also hold sFID's `mu_s` and `sigma_s` and, as
`arr_0`, the reference images precision/recall are computed against (their size is the image size).
"""
from __future__ import annotations

import io
import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

from tarflow.checkpoint import load_torch_data
from tarflow.schema import input_file

from ..storage.files import resolve, write_below
from .registry import EXTRACTORS

if TYPE_CHECKING:
    from .metrics import KeptFeatures

STATS_FORMAT = "tarflow-gs-fid-stats-v1"
TORCHMETRICS_KEYS = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


class StatsError(ValueError):
    """A statistics file that cannot be read as one."""


class StatsMismatchError(StatsError):
    """Two sets of statistics that cannot be compared (different extractor, image size or dimension)."""


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _network(extractor: str) -> str:
    """Extractors of one network give statistics that compare with each other's features."""
    return EXTRACTORS[extractor].network if extractor in EXTRACTORS else extractor


@dataclass
class FeatureStats:
    """Sufficient statistics of a set of feature vectors; `+` merges two disjoint sets."""

    count: int
    sum: np.ndarray  # (D,) float64
    sum_outer: np.ndarray  # (D, D) float64, sum of x x^T

    @classmethod
    def of(cls, features) -> "FeatureStats":
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be (N, D); got shape {x.shape}")
        return cls(x.shape[0], x.sum(axis=0), x.T @ x)

    @property
    def dim(self) -> int:
        return self.sum.shape[0]

    def __add__(self, other: "FeatureStats") -> "FeatureStats":
        if other.dim != self.dim:
            raise StatsMismatchError(f"cannot merge {self.dim}-d and {other.dim}-d feature statistics")
        return FeatureStats(self.count + other.count, self.sum + other.sum, self.sum_outer + other.sum_outer)

    def __sub__(self, part: "FeatureStats") -> "FeatureStats":
        """The set without `part`, a subset of it (a jackknife's leave-one-group-out statistics)."""
        if part.dim != self.dim or part.count > self.count:
            raise StatsMismatchError(f"cannot take {part.count} {part.dim}-d features out of {self.count} {self.dim}-d")
        return FeatureStats(self.count - part.count, self.sum - part.sum, self.sum_outer - part.sum_outer)

    @property
    def mu(self) -> np.ndarray:
        return self.sum / self.count

    @property
    def sigma(self) -> np.ndarray:
        """Sample covariance with n - 1 in the denominator, as `np.cov(features, rowvar=False)`."""
        if self.count < 2:
            raise StatsError(f"a covariance needs at least 2 images; have {self.count}")
        return (self.sum_outer - np.outer(self.sum, self.sum) / self.count) / (self.count - 1)


# a covariance read from a file is symmetric and positive semi-definite up to the rounding of float32
# storage (relative error ~6e-8 per entry, at most ~3e-6 of the largest eigenvalue at 2048-d); anything
# further off is not a covariance, and FID from it can come out negative or plausible and wrong
COVARIANCE_RTOL = 1e-5
FID_RTOL = 1e-6  # of the traces: sqrtm's rounding on rank-deficient covariances


def _check_covariance(sigma: np.ndarray, where: str) -> None:
    scale = float(np.abs(sigma).max())
    if not np.allclose(sigma, sigma.T, rtol=0, atol=COVARIANCE_RTOL * scale):
        raise StatsError(f"{where}: sigma is not symmetric (largest |sigma - sigma^T| "
                         f"{float(np.abs(sigma - sigma.T).max()):.3g} of entries up to {scale:.3g}): not a covariance")
    eigenvalues = np.linalg.eigvalsh(sigma)
    if eigenvalues[0] < -COVARIANCE_RTOL * max(float(eigenvalues[-1]), 0.0):
        raise StatsError(f"{where}: sigma has eigenvalue {eigenvalues[0]:.4g} (largest {eigenvalues[-1]:.4g}): a "
                         "covariance is positive semi-definite, so this is not one")


@dataclass
class FIDStats:
    """mu and sigma of one image set, with what made them: the unit reference `.npz` files hold."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int | None  # None: a file that does not say (ADM / TTUR)
    extractor: str
    image_size: tuple[int, int]  # (H, W) of the images before the extractor's own resize
    dataset: str  # where the images came from (dataset name, folder, shard URI)
    kid: "KeptFeatures | None" = None  # the strided feature subset KID compares (None: a file without one)
    mu_s: np.ndarray | None = None  # sFID's spatial features' mean and covariance (None: none kept)
    sigma_s: np.ndarray | None = None

    def __post_init__(self):
        """Statistics that torch-fidelity's distance can take: shapes that agree and finite numbers, so a
        malformed file is named when it is read, not as an assertion after the samples' pass."""
        where = f"statistics of {self.dataset}"
        self.mu, self.sigma = np.asarray(self.mu, np.float64), np.asarray(self.sigma, np.float64)
        if self.mu.ndim != 1 or self.mu.shape[0] < 1:
            raise StatsError(f"{where}: mu has shape {self.mu.shape}, not (D,)")
        dim = self.mu.shape[0]
        if self.sigma.shape != (dim, dim):
            raise StatsError(f"{where}: sigma has shape {self.sigma.shape}, mu has {dim} features: sigma must be "
                             f"({dim}, {dim})")
        for name, value in (("mu", self.mu), ("sigma", self.sigma)):
            if not np.isfinite(value).all():
                raise StatsError(f"{where}: {name} holds NaN or inf")
        _check_covariance(self.sigma, where)
        if self.count is not None and (not _is_int(self.count) or self.count < 2):
            raise StatsError(f"{where}: count={self.count!r}, a covariance needs at least 2 images")
        if len(self.image_size) != 2 or any(not _is_int(s) or s < 1 for s in self.image_size):
            raise StatsError(f"{where}: image_size={self.image_size!r}, not a positive (H, W)")
        if (self.mu_s is None) != (self.sigma_s is None):
            raise StatsError(f"{where}: mu_s and sigma_s come together (sFID's spatial statistics)")
        if self.mu_s is not None:
            self.mu_s, self.sigma_s = np.asarray(self.mu_s, np.float64), np.asarray(self.sigma_s, np.float64)
            dim_s = self.mu_s.shape[0] if self.mu_s.ndim == 1 else -1
            if dim_s < 1 or self.sigma_s.shape != (dim_s, dim_s):
                raise StatsError(f"{where}: mu_s has shape {self.mu_s.shape}, sigma_s {self.sigma_s.shape}: not (D,) "
                                 "and (D, D)")
            if not (np.isfinite(self.mu_s).all() and np.isfinite(self.sigma_s).all()):
                raise StatsError(f"{where}: mu_s or sigma_s holds NaN or inf")
            _check_covariance(self.sigma_s, f"{where} (spatial, sFID's)")
        if self.kid is not None:
            index, features = np.asarray(self.kid.index), np.asarray(self.kid.features)
            if index.ndim != 1 or features.shape != (len(index), dim) or not np.isfinite(features).all():
                raise StatsError(f"{where}: KID's kept features are {features.shape} for {index.shape} indices, "
                                 f"not ({len(index)}, {dim}) finite values")

    @classmethod
    def from_features(cls, stats: FeatureStats, extractor: str, image_size, dataset: str,
                      kid: "KeptFeatures | None" = None, spatial: FeatureStats | None = None) -> "FIDStats":
        try:
            sigma, sigma_s = stats.sigma, None if spatial is None else spatial.sigma
        except StatsError as e:
            raise StatsError(f"{dataset}: {e}") from None
        return cls(stats.mu, sigma, stats.count, extractor, tuple(int(s) for s in image_size), str(dataset), kid,
                   None if spatial is None else spatial.mu, sigma_s)

    def save(self, path) -> Path:
        path = Path(path)
        kid = {} if self.kid is None else {"kid_index": self.kid.index, "kid_features": self.kid.features}
        spatial = {} if self.mu_s is None else {"mu_s": self.mu_s, "sigma_s": self.sigma_s}  # ADM's names
        buffer = io.BytesIO()
        np.savez(buffer, mu=self.mu, sigma=self.sigma, n=np.int64(-1 if self.count is None else self.count),
                 extractor=np.str_(self.extractor),
                 image_size=np.asarray(self.image_size, np.int64), dataset=np.str_(self.dataset),
                 format=np.str_(STATS_FORMAT), **kid, **spatial)
        fs, where = resolve(str(path))  # a crash never leaves a truncated file
        write_below(fs, *where.rsplit("/", 1), buffer.getvalue())
        return path

    @classmethod
    def load(cls, path) -> "FIDStats":
        """Statistics in any form `load_stats` reads, with nothing stated for files that do not say what made them."""
        return load_stats(path)

    def check_extractor(self, extractor: str, where: str = "reference statistics") -> None:
        """Raise StatsMismatchError unless these stats come from `extractor`'s network, with its dimension."""
        if _network(self.extractor) != _network(extractor):
            raise StatsMismatchError(f"{where} ({self.dataset}) were computed with extractor {self.extractor!r}, "
                                     f"the samples with {extractor!r}: recompute the reference with --extractor "
                                     f"{extractor}")
        if extractor in EXTRACTORS and self.mu.shape[0] != EXTRACTORS[extractor].dim:
            raise StatsMismatchError(f"{where} ({self.dataset}) have {self.mu.shape[0]} features, extractor "
                                     f"{extractor} gives {EXTRACTORS[extractor].dim}: they are not its statistics")

    def check_comparable(self, extractor: str, image_size, where: str = "reference statistics") -> None:
        """Raise StatsMismatchError unless these stats were made by `extractor` on images of `image_size`."""
        self.check_extractor(extractor, where)
        if tuple(self.image_size) != tuple(int(s) for s in image_size):
            raise StatsMismatchError(f"{where} ({self.dataset}) are of {self.image_size[0]}x{self.image_size[1]} "
                                     f"images, the samples are {image_size[0]}x{image_size[1]}: compare images of "
                                     "one size")

    def describe(self) -> dict:
        return {"count": self.count, "extractor": self.extractor, "image_size": list(self.image_size),
                "dataset": self.dataset, "dim": int(self.mu.shape[0])}


def frechet_distance(a: FIDStats, b: FIDStats, spatial: bool = False) -> float:
    """FID between two sets of statistics, by torch-fidelity's own formula; with `spatial`, sFID (the same
    distance between their spatial statistics, as ADM's evaluator computes it)."""
    if _network(a.extractor) != _network(b.extractor):
        raise StatsMismatchError(f"statistics from different extractors: {a.extractor!r} vs {b.extractor!r}")
    (mu_a, sigma_a), (mu_b, sigma_b) = ((s.mu_s, s.sigma_s) if spatial else (s.mu, s.sigma) for s in (a, b))
    name = "sFID" if spatial else "FID"
    if mu_a.shape != mu_b.shape:
        raise StatsMismatchError(f"{name}: feature dimensions differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    # float64 on both sides (FIDStats holds float64): torch-fidelity asserts equal dtypes
    fid = float(fid_statistics_to_metric({"mu": mu_a, "sigma": sigma_a}, {"mu": mu_b, "sigma": sigma_b},
                                         verbose=False)[KEY_METRIC_FID])
    if not math.isfinite(fid):
        raise StatsError(f"{name} of {a.dataset} vs {b.dataset} is {fid}, not a number: their statistics are too "
                         "large, or their covariances have no real square root")
    # a distance: below zero only by the rounding of the trace terms it is a difference of
    if fid < -FID_RTOL * (np.trace(sigma_a) + np.trace(sigma_b)):
        raise StatsError(f"{name} of {a.dataset} vs {b.dataset} came out {fid:.6g}, below zero: a distance cannot "
                         "be; the statistics are not what they claim")
    return max(fid, 0.0)


def npz_images(path) -> tuple[int, tuple[int, ...]] | None:
    """(count, (H, W, C)) of the uint8 images an ADM reference batch holds as `arr_0` (what precision/recall's
    reference features come from), read from the array's header alone; None if it holds none."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as f:
            shape, dtype = _npy_header(f)
    except KeyError:
        return None
    if dtype != np.uint8 or len(shape) != 4 or shape[3] not in (1, 3) or min(shape) < 1:
        raise StatsError(f"{path}: arr_0 is {dtype} {shape}, not uint8 images (N, H, W, 1 or 3)")
    return shape[0], tuple(shape[1:])


def npz_image_rows(path, start: int, stop: int) -> np.ndarray:
    """Images start..stop-1 of an ADM reference batch's `arr_0`, read without loading the rest (10,000 images
    at 256 px are 2 GB: each task reads its own rows)."""
    with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as f:
        shape, dtype = _npy_header(f)
        row = int(np.prod(shape[1:])) * dtype.itemsize
        f.seek(f.tell() + start * row)
        data = f.read((stop - start) * row)
    return np.frombuffer(data, dtype).reshape(stop - start, *shape[1:])


def _npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if fortran or dtype.hasobject:
        raise StatsError("arr_0 is not a plain C-ordered array of numbers")
    return tuple(shape), dtype


def _size(path: Path, image_size) -> tuple[int, int] | None:
    if image_size is not None:
        return (int(image_size), int(image_size)) if isinstance(image_size, int) else tuple(image_size)
    found = re.search(r"_(\d+)_fid_stats", path.name)  # the published names: afhq_256_fid_stats.pth
    return (int(found.group(1)),) * 2 if found else None


def load_stats(path, extractor: str | None = None, image_size=None) -> FIDStats:
    """Reference statistics from any of the forms in the module docstring. `extractor` and `image_size`
    (an int or (H, W)) say what made a file that does not record it; a file that does is read as it says."""
    path = input_file(path, "reference statistics")
    if path.suffix in (".pth", ".pt"):
        return _torchmetrics_state(path, extractor, image_size)
    try:
        with np.load(path, allow_pickle=False) as f:
            files = set(f.files)
            if {"n", "extractor", "image_size", "dataset"} <= files:
                from .metrics import KeptFeatures

                n = int(f["n"])
                kid = KeptFeatures(f["kid_index"], f["kid_features"]) if "kid_features" in files else None
                return FIDStats(f["mu"], f["sigma"], None if n < 0 else n, str(f["extractor"]),
                                tuple(int(s) for s in f["image_size"]), str(f["dataset"]), kid,
                                *_spatial(f, files))
            if not {"mu", "sigma"} <= files:
                raise StatsError(f"{path} holds {sorted(files)}: not FID statistics (no mu and sigma)")
            images = npz_images(path) if "arr_0" in files else None
            size = _size(path, image_size) or (images[1][:2] if images else None)  # an ADM batch's images say
            if extractor is None or size is None:
                raise StatsError(f"{path} holds only mu and sigma (the ADM / TTUR form) and does not say what "
                                 "made them: give the extractor and the image size they were computed with "
                                 "(fid.reference_extractor and fid.reference_image_size; --reference-extractor, "
                                 "--reference-image-size), e.g. inception-v3-compat at the dataset's resolution")
            return FIDStats(np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64), None, extractor,
                            size, path.name, None, *_spatial(f, files))
    except (OSError, ValueError, TypeError, KeyError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, StatsError):
            raise
        if "allow_pickle" in str(e):
            raise StatsError(f"{path} holds pickled Python objects, not only arrays: refused, statistics are read "
                             "as data (numpy with allow_pickle=False), never run as code") from None
        raise StatsError(f"{path} is not a readable statistics .npz ({type(e).__name__}: {e})") from None


def _spatial(f, files) -> tuple[np.ndarray | None, np.ndarray | None]:
    return (f["mu_s"], f["sigma_s"]) if {"mu_s", "sigma_s"} <= files else (None, None)


def _shapes(*values) -> str:
    return ", ".join(str(tuple(v.shape)) if isinstance(v, torch.Tensor) else type(v).__name__ for v in values)


def _torchmetrics_state(path, extractor: str | None, image_size) -> FIDStats:
    state = load_torch_data(path, "a torchmetrics FID state", StatsError)
    found = {k: next((v for name, v in state.items() if name.endswith(k)), None) for k in TORCHMETRICS_KEYS} \
        if isinstance(state, dict) else {}
    if not found or any(v is None for v in found.values()):
        raise StatsError(f"{path} is not a torchmetrics FrechetInceptionDistance state: it lacks "
                         f"{', '.join(k for k, v in found.items() if v is None) or 'a state dict'}")
    size = _size(path, image_size)
    if size is None:
        raise StatsError(f"{path} does not say the image size its statistics were computed at: give "
                         "fid.reference_image_size (--reference-image-size)")
    total, outer, count = (found[k] for k in TORCHMETRICS_KEYS)
    if not all(isinstance(v, torch.Tensor) for v in (total, outer, count)) or total.dim() != 1 \
            or outer.shape != (len(total), len(total)) or count.numel() != 1 or not count >= 2:
        raise StatsError(f"{path}: real_features_sum, real_features_cov_sum and real_features_num_samples must be "
                         f"tensors (D,), (D, D) and a count >= 2; got {_shapes(total, outer, count)}")
    features = FeatureStats(int(count), total.double().numpy(), outer.double().numpy())
    # torchmetrics' FID network is torch-fidelity's Inception: the implied extractor
    return FIDStats.from_features(features, extractor or "inception-v3-compat", size, path.name)
