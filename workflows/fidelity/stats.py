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
`afhq_256_fid_stats.pth`); and the ADM / TTUR `.npz` (mu and sigma only), whose extractor and image
size the user must state.
"""
from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

from ..storage.files import resolve, write_atomic

if TYPE_CHECKING:
    from .metrics import KeptFeatures

STATS_FORMAT = "tarflow-gs-fid-stats-v1"
# extractors that are one network: statistics of one compare with features of the other
NETWORKS = {name: "inception-v3 (TF 2015-12-05)" for name in ("inception-v3-compat", "inception-v3-torchscript")}
TORCHMETRICS_KEYS = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


class StatsError(ValueError):
    """A statistics file that cannot be read as one."""


class StatsMismatchError(StatsError):
    """Two sets of statistics that cannot be compared (different extractor, image size or dimension)."""


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

    @property
    def mu(self) -> np.ndarray:
        return self.sum / self.count

    @property
    def sigma(self) -> np.ndarray:
        """Sample covariance with n - 1 in the denominator, as `np.cov(features, rowvar=False)`."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 images; have {self.count}")
        return (self.sum_outer - np.outer(self.sum, self.sum) / self.count) / (self.count - 1)


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

    @classmethod
    def from_features(cls, stats: FeatureStats, extractor: str, image_size, dataset: str,
                      kid: "KeptFeatures | None" = None) -> "FIDStats":
        return cls(stats.mu, stats.sigma, stats.count, extractor, tuple(int(s) for s in image_size), str(dataset), kid)

    def save(self, path) -> Path:
        path = Path(path)
        kid = {} if self.kid is None else {"kid_index": self.kid.index, "kid_features": self.kid.features}
        buffer = io.BytesIO()
        np.savez(buffer, mu=self.mu, sigma=self.sigma, n=np.int64(-1 if self.count is None else self.count),
                 extractor=np.str_(self.extractor),
                 image_size=np.asarray(self.image_size, np.int64), dataset=np.str_(self.dataset),
                 format=np.str_(STATS_FORMAT), **kid)
        write_atomic(*resolve(str(path)), buffer.getvalue())  # a crash never leaves a truncated file
        return path

    @classmethod
    def load(cls, path) -> "FIDStats":
        """Statistics in any form `load_stats` reads, with nothing stated for files that do not say what made them."""
        return load_stats(path)

    def check_extractor(self, extractor: str, where: str = "reference statistics") -> None:
        if NETWORKS.get(self.extractor, self.extractor) != NETWORKS.get(extractor, extractor):
            raise StatsMismatchError(f"{where} ({self.dataset}) were computed with extractor {self.extractor!r}, "
                                     f"the samples with {extractor!r}: recompute the reference with --extractor "
                                     f"{extractor}")

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


def frechet_distance(a: FIDStats, b: FIDStats) -> float:
    """FID between two sets of statistics, by torch-fidelity's own formula."""
    if NETWORKS.get(a.extractor, a.extractor) != NETWORKS.get(b.extractor, b.extractor):
        raise StatsMismatchError(f"statistics from different extractors: {a.extractor!r} vs {b.extractor!r}")
    if a.mu.shape != b.mu.shape:
        raise StatsMismatchError(f"feature dimensions differ: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    # torch-fidelity asserts equal dtypes; float64 on both sides keeps the merged precision.
    stat_a, stat_b = ({"mu": np.asarray(s.mu, np.float64), "sigma": np.asarray(s.sigma, np.float64)} for s in (a, b))
    return float(fid_statistics_to_metric(stat_a, stat_b, verbose=False)[KEY_METRIC_FID])


def _size(path: Path, image_size) -> tuple[int, int] | None:
    if image_size is not None:
        return (int(image_size), int(image_size)) if isinstance(image_size, int) else tuple(image_size)
    found = re.search(r"_(\d+)_fid_stats", path.name)  # the published names: afhq_256_fid_stats.pth
    return (int(found.group(1)),) * 2 if found else None


def load_stats(path, extractor: str | None = None, image_size=None) -> FIDStats:
    """Reference statistics from any of the forms in the module docstring. `extractor` and `image_size`
    (an int or (H, W)) say what made a file that does not record it; a file that does is read as it says."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path} do not exist")
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
                                tuple(int(s) for s in f["image_size"]), str(f["dataset"]), kid)
            if not {"mu", "sigma"} <= files:
                raise StatsError(f"{path} holds {sorted(files)}: not FID statistics (no mu and sigma)")
            size = _size(path, image_size)
            if extractor is None or size is None:
                raise StatsError(f"{path} holds only mu and sigma (the ADM / TTUR form) and does not say what "
                                 "made them: give the extractor and the image size they were computed with "
                                 "(fid.reference_extractor and fid.reference_image_size; --reference-extractor, "
                                 "--reference-image-size), e.g. inception-v3-compat at the dataset's resolution")
            return FIDStats(np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64), None, extractor,
                            size, path.name)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, StatsError):
            raise
        raise StatsError(f"{path} is not a readable statistics .npz ({type(e).__name__}: {e})") from None


def _torchmetrics_state(path: Path, extractor: str | None, image_size) -> FIDStats:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for foreign or truncated files
        raise StatsError(f"{path} is not a readable torch file ({type(e).__name__}: {e})") from None
    found = {k: next((v for name, v in state.items() if name.endswith(k)), None) for k in TORCHMETRICS_KEYS} \
        if isinstance(state, dict) else {}
    if not found or any(v is None for v in found.values()):
        raise StatsError(f"{path} is not a torchmetrics FrechetInceptionDistance state: it lacks "
                         f"{', '.join(k for k, v in found.items() if v is None) or 'a state dict'}")
    size = _size(path, image_size)
    if size is None:
        raise StatsError(f"{path} does not say the image size its statistics were computed at: give "
                         "fid.reference_image_size (--reference-image-size)")
    features = FeatureStats(int(found["real_features_num_samples"]), found["real_features_sum"].double().numpy(),
                            found["real_features_cov_sum"].double().numpy())
    # torchmetrics' FID network is torch-fidelity's Inception: the implied extractor
    return FIDStats.from_features(features, extractor or "inception-v3-compat", size, path.name)
