"""Mergeable feature statistics for distributed FID, and the `.npz` files reference statistics live in.

Shaped like StyleGAN2-ADA's `FeatureStats`: a task reduces its images to (count, sum, sum of outer
products) in float64, the driver adds those up, and only then are mu and sigma formed, so no process
ever holds all features. sigma follows torch-fidelity's convention (`np.cov`, divides by n - 1, not
StyleGAN2-ADA's n), and the distance itself is torch-fidelity's `fid_statistics_to_metric`, so a
merged FID equals single-process torch-fidelity on the same images.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

STATS_FORMAT = "tarflow-gs-fid-stats-v1"


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
    count: int
    extractor: str
    image_size: tuple[int, int]  # (H, W) of the images before the extractor's own resize
    dataset: str  # where the images came from (dataset name, folder, shard URI)

    @classmethod
    def from_features(cls, stats: FeatureStats, extractor: str, image_size, dataset: str) -> "FIDStats":
        return cls(stats.mu, stats.sigma, stats.count, extractor, tuple(int(s) for s in image_size), str(dataset))

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, mu=self.mu, sigma=self.sigma, n=np.int64(self.count), extractor=np.str_(self.extractor),
                 image_size=np.asarray(self.image_size, np.int64), dataset=np.str_(self.dataset),
                 format=np.str_(STATS_FORMAT))
        tmp.replace(path)  # a crash mid-write never leaves a truncated file under the real name
        return path

    @classmethod
    def load(cls, path) -> "FIDStats":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reference statistics {path} do not exist")
        try:
            with np.load(path, allow_pickle=False) as f:
                missing = {"mu", "sigma", "n", "extractor", "image_size", "dataset"} - set(f.files)
                if missing:
                    raise StatsError(f"{path} is not a tarflow-gs FID statistics file: missing {sorted(missing)}")
                return cls(f["mu"], f["sigma"], int(f["n"]), str(f["extractor"]),
                           tuple(int(s) for s in f["image_size"]), str(f["dataset"]))
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            if isinstance(e, StatsError):
                raise
            raise StatsError(f"{path} is not a readable statistics .npz ({type(e).__name__}: {e})") from None

    def check_extractor(self, extractor: str, where: str = "reference statistics") -> None:
        if self.extractor != extractor:
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
    if a.extractor != b.extractor:
        raise StatsMismatchError(f"statistics from different extractors: {a.extractor!r} vs {b.extractor!r}")
    if a.mu.shape != b.mu.shape:
        raise StatsMismatchError(f"feature dimensions differ: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    # torch-fidelity asserts equal dtypes; float64 on both sides keeps the merged precision.
    stat_a, stat_b = ({"mu": np.asarray(s.mu, np.float64), "sigma": np.asarray(s.sigma, np.float64)} for s in (a, b))
    return float(fid_statistics_to_metric(stat_a, stat_b, verbose=False)[KEY_METRIC_FID])
