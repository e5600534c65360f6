"""What one pass over a set of images keeps besides FID's statistics: Inception Score sums and KID's subset.

- Inception Score needs the mean over images of sum_y p log p and the mean class distribution
  p(y); both are sums, so IS over all images is exact from merged parts. It equals torch-fidelity's
  `isc_features_to_metric(logits, splits=1)` (torch-fidelity's default is 10 splits, whose mean and
  spread depend on a shuffle; one split is the score of the whole set).
- KID is a mean over random subsets of kernel MMDs: it needs features, not sums. Each task keeps
  the features of the images whose index in the set is a multiple of a stride chosen from the set's
  size, so a set keeps at most `kid_samples` feature rows (8 MiB at 2048-d for 1000) whatever its
  size, the same rows however it is split into tasks, ordered by index. KID is then
  torch-fidelity's `kid_features_to_metric` on those rows: an estimate of the KID over all images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

KID_SUBSETS = 100  # torch-fidelity's defaults
KID_SUBSET_SIZE = 1000


@dataclass
class ISCStats:
    """Sums over images of sum_y p(y|x) log p(y|x) and of p(y|x); `+` merges disjoint sets."""

    count: int
    sum_plogp: float
    sum_p: np.ndarray  # (C,) float64

    @classmethod
    def of(cls, logits) -> "ISCStats":
        x = torch.as_tensor(logits).double()
        p, log_p = x.softmax(dim=1), x.log_softmax(dim=1)
        return cls(x.shape[0], float((p * log_p).sum()), p.sum(dim=0).numpy())

    def __add__(self, other: "ISCStats") -> "ISCStats":
        return ISCStats(self.count + other.count, self.sum_plogp + other.sum_plogp, self.sum_p + other.sum_p)

    def score(self) -> float:
        q = self.sum_p / self.count
        return math.exp((self.sum_plogp - float(self.sum_p @ np.log(q))) / self.count)


def kid_stride(num_images: int, kid_samples: int) -> int:
    """Keep every stride-th image: at most `kid_samples` of `num_images` (0: keep none)."""
    return 0 if kid_samples <= 0 else max(1, math.ceil(num_images / kid_samples))


@dataclass
class KeptFeatures:
    """Feature rows of a strided subset of a set, with each row's index in the set."""

    index: np.ndarray  # (k,) int64
    features: np.ndarray  # (k, D) float32

    @classmethod
    def of(cls, features: np.ndarray, offset: int, stride: int) -> "KeptFeatures":
        """The rows of `features` (images offset, offset + 1, ... of the set) whose index is a multiple of `stride`."""
        if stride <= 0:
            return cls(np.zeros(0, np.int64), np.zeros((0, features.shape[1]), np.float32))
        index = np.arange(offset, offset + len(features))
        keep = index % stride == 0
        return cls(index[keep], np.asarray(features[keep], np.float32))

    def __add__(self, other: "KeptFeatures") -> "KeptFeatures":
        index = np.concatenate([self.index, other.index])
        order = np.argsort(index, kind="stable")  # arrival order must not matter
        return KeptFeatures(index[order], np.concatenate([self.features, other.features])[order])


def kid(a: np.ndarray, b: np.ndarray) -> dict:
    """torch-fidelity's KID of two feature subsets, with its subset size capped by the smaller one."""
    size = min(KID_SUBSET_SIZE, len(a), len(b))
    if size < 2:
        raise ValueError(f"KID needs at least 2 kept features on each side; have {len(a)} and {len(b)}")
    out = kid_features_to_metric(torch.tensor(np.asarray(a)), torch.tensor(np.asarray(b)),
                                 kid_subsets=KID_SUBSETS, kid_subset_size=size, verbose=False)
    return {"kid_mean": out[KEY_METRIC_KID_MEAN], "kid_std": out[KEY_METRIC_KID_STD], "kid_subset_size": size,
            "kid_subsets": KID_SUBSETS, "kid_features": [len(a), len(b)]}
