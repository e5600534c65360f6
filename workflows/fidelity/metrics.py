"""What one pass over a set of images keeps besides FID's statistics: Inception Score sums and KID's subset.

- Inception Score needs the mean over images of sum_y p log p and the mean class distribution
  p(y); both are sums, so IS over all images is exact from merged parts. It equals torch-fidelity's
  `isc_features_to_metric(logits, splits=1)`. Papers report torch-fidelity's default, the mean and
  std over 10 splits of a seeded shuffle: which split an image falls in is a rule of its index in the
  set (`is_split`), so each split's sums merge too, and the 10 scores equal torch-fidelity's on the
  same logits in the set's order.
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


IS_SPLITS, IS_SEED = 10, 2020  # torch-fidelity's isc_splits and rng_seed: the split score papers report


def is_split(index: np.ndarray, num_images: int) -> np.ndarray:
    """The Inception Score split of each image (by its index in the set) under torch-fidelity's rule: the
    set is permuted by `np.random.RandomState(2020).permutation(num_images)` and split i holds permuted
    positions [i * N // 10, (i + 1) * N // 10). A rule of the index alone, so any split of the work into
    tasks gives every image the same split."""
    position = np.empty(num_images, np.int64)
    position[np.random.RandomState(IS_SEED).permutation(num_images)] = np.arange(num_images)
    bounds = np.arange(IS_SPLITS + 1) * num_images // IS_SPLITS
    return np.searchsorted(bounds, position[np.asarray(index)], side="right") - 1


@dataclass
class ISCStats:
    """Per Inception Score split: the images, their sum of sum_y p(y|x) log p(y|x) and of p(y|x); `+`
    merges disjoint sets."""

    count: np.ndarray  # (IS_SPLITS,) int64
    sum_plogp: np.ndarray  # (IS_SPLITS,) float64
    sum_p: np.ndarray  # (IS_SPLITS, C) float64

    @classmethod
    def of(cls, logits, index: np.ndarray, num_images: int) -> "ISCStats":
        """The sums of images `index` (their place in a set of `num_images`) with class logits `logits`."""
        x = torch.as_tensor(logits).double()
        p, log_p = x.softmax(dim=1), x.log_softmax(dim=1)
        split = is_split(index, num_images)
        sum_p = np.zeros((IS_SPLITS, x.shape[1]))
        np.add.at(sum_p, split, p.numpy())
        return cls(np.bincount(split, minlength=IS_SPLITS), np.bincount(split, (p * log_p).sum(dim=1).numpy(),
                                                                          minlength=IS_SPLITS), sum_p)

    def __add__(self, other: "ISCStats") -> "ISCStats":
        return ISCStats(self.count + other.count, self.sum_plogp + other.sum_plogp, self.sum_p + other.sum_p)

    @staticmethod
    def _score(count, sum_plogp: float, sum_p: np.ndarray) -> float:
        return math.exp((sum_plogp - float(sum_p @ np.log(sum_p / count))) / count)

    def score(self) -> float:
        """The exact score of the whole set (one split)."""
        return self._score(int(self.count.sum()), float(self.sum_plogp.sum()), self.sum_p.sum(axis=0))

    def split_scores(self) -> tuple[float, float] | None:
        """(mean, std) of the 10 split scores as torch-fidelity reports them (np.std: divides by 10); None for a
        set of fewer than 10 images, where a split is empty."""
        if self.count.min() < 1:
            return None
        scores = [self._score(int(n), float(s), p) for n, s, p in zip(self.count, self.sum_plogp, self.sum_p)]
        return float(np.mean(scores)), float(np.std(scores))


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


# ---- precision and recall (Kynkäänniemi et al. 2019), exact, block by block --------------------------------------
# Each set's features stay where the pass left them (one block per task, in Ray's object store); a block's k-NN
# radii, then its coverage by the other set, are computed against the other blocks one at a time, so no process
# holds more than two blocks and their distances. In float64: torch-fidelity computes in its features' dtype
# (float32), where a distance within a rounding of a radius could fall either side.
PRC_NEIGHBORHOOD = 3  # k: torch-fidelity's prc_neighborhood, ADM's nhood_sizes


def knn_radii(block: np.ndarray, blocks, k: int = PRC_NEIGHBORHOOD) -> np.ndarray:
    """Distance of each row of `block` to its k-th nearest neighbour among the rows of `blocks` (its whole set,
    itself included at distance 0: the (k+1)-th smallest, as torch-fidelity's `kthvalue(k + 1)` and ADM count)."""
    x, best = torch.from_numpy(np.asarray(block, np.float64)), None
    for other in blocks:
        d = torch.cdist(x, torch.from_numpy(np.asarray(other, np.float64)))
        best = d if best is None else torch.cat([best, d], dim=1)
        best = best.topk(min(k + 1, best.shape[1]), dim=1, largest=False).values  # sorted, smallest first
    if best is None or best.shape[1] < k + 1:
        raise ValueError(f"precision and recall need more than k={k} images in each set")
    return best[:, k].numpy()


def covered(block: np.ndarray, blocks_with_radii) -> int:
    """How many rows of `block` lie inside the manifold of the other set: within the k-NN radius of one of its
    rows (`blocks_with_radii`: (rows, their radii) of the other set, block by block)."""
    x = torch.from_numpy(np.asarray(block, np.float64))
    inside = torch.zeros(len(x), dtype=torch.bool)
    for other, radii in blocks_with_radii:
        d = torch.cdist(x, torch.from_numpy(np.asarray(other, np.float64)))
        inside |= (d <= torch.from_numpy(np.asarray(radii, np.float64))).any(dim=1)
    return int(inside.sum())


def f_score(precision: float, recall: float) -> float:
    """torch-fidelity's F-score of precision and recall (its 1e-5 floor keeps 0/0 out)."""
    return 2 * precision * recall / max(1e-5, precision + recall)
