"""FID of a plan beside sequential sampling's, over the same sample ids, with the uncertainty of each and of
their difference: what "speed without degrading FID" needs to be read off a report.

A FID over N samples moves with the samples drawn; the paper's claim (FID within +0.13 of sequential's)
means something only beside that noise. It is estimated here, not assumed, by the delete-a-group
jackknife: the sample ids fall into K groups (`id_groups`); FID is recomputed K times, each time without
one group (mergeable statistics: the total minus the group), and the spread of those K values gives the
standard error, (K - 1)/K * sum (theta_k - mean)^2 under the root (Efron & Tibshirani 1993, ch. 11). Both
sets leave out the same ids each time, so the difference's error is paired: two sets whose images barely
differ have a difference far better known than either FID.

The groups are blocks of consecutive ids, not id mod K: every label policy is a rule of the id that cycles
through its classes (`uniform`: label = id mod 10), so a block of consecutive ids holds the classes in the
run's proportions, as the whole run does, and leaving one out leaves the class balance as it is. Groups of
id mod 10 would hold one class each, and leaving out a class moves FID far more than sampling does (on the
demo's 1,000 samples: an error of 33 where consecutive blocks give 3.8, and a bootstrap within classes 2.9).
"""
from __future__ import annotations

import numpy as np
from pydantic import NonNegativeFloat, PositiveInt
from pydantic.dataclasses import dataclass

from tarflow.schema import JSONForm

from ..storage.history import MEASURED
from .registry import NOISE_SIGMAS
from .stats import FeatureStats, FIDStats, StatsError, frechet_distance

JACKKNIFE_GROUPS = 10  # groups of sample ids: 9 degrees of freedom, 10 leave-one-out FIDs per set


def id_groups(ids: np.ndarray, num_images: int, groups: int) -> np.ndarray:
    """The jackknife group of each of `ids` in a set of ids 0..num_images-1: K blocks of consecutive ids, of equal
    size (+-1), none empty where K <= num_images; the same whichever shard or worker holds an id."""
    return np.asarray(ids) * groups // num_images


@dataclass(config=MEASURED)
class FidDifference(JSONForm):
    """FID of the plan's samples and of sequential sampling's over the same ids, each with its jackknife
    standard error, and plan minus sequential with the paired one."""

    fid_sequential: NonNegativeFloat
    fid_plan: NonNegativeFloat
    sequential_se: NonNegativeFloat  # the FID's own sampling noise at this many samples
    plan_se: NonNegativeFloat
    difference: float  # plan - sequential: > 0 where the plan's samples score worse
    difference_se: NonNegativeFloat  # paired: both sides leave out the same ids
    sample_count: PositiveInt  # per side, the same ids
    groups: PositiveInt
    extractor: str

    json_name = "paired FID"

    def within_noise(self, sigmas: float = NOISE_SIGMAS) -> bool:
        """Whether the plan's FID is worse than sequential's by no more than `sigmas` times the FID's own
        sampling noise (sequential's standard error): a difference no sample of this size could tell."""
        return self.difference <= sigmas * self.sequential_se

    def text(self) -> str:
        return (f"FID sequential {self.fid_sequential:.4f} +- {self.sequential_se:.4f}, plan {self.fid_plan:.4f} "
                f"+- {self.plan_se:.4f}: difference {self.difference:+.4f} +- {self.difference_se:.4f} (same "
                f"{self.sample_count} sample ids, jackknife over {self.groups} groups, {self.extractor})")


def _jackknife(groups: list[FeatureStats], reference: FIDStats, image_size, name: str) -> tuple[float, np.ndarray]:
    """(FID over all groups, the K leave-one-group-out FIDs)."""
    total = groups[0]
    for g in groups[1:]:
        total = total + g

    def fid(stats: FeatureStats) -> float:
        return frechet_distance(FIDStats.from_features(stats, reference.extractor, image_size, name), reference)

    return fid(total), np.array([fid(total - g) for g in groups])


def _se(leave_outs: np.ndarray) -> float:
    k = len(leave_outs)
    return float(np.sqrt((k - 1) / k * np.sum((leave_outs - leave_outs.mean()) ** 2)))


def paired_fid(plan: list[FeatureStats], sequential: list[FeatureStats], reference: FIDStats,
               image_size) -> FidDifference:
    """The comparison from each set's per-group statistics (`groups[k]`: the images `id_groups` puts in group
    k), made from the same ids on both sides (the caller checks the sets; the counts are checked here)."""
    if len(plan) != len(sequential) or len(plan) < 2:
        raise StatsError(f"a jackknife needs the same K >= 2 groups on both sides; have {len(plan)} and "
                         f"{len(sequential)}")
    counts = [g.count for g in plan], [g.count for g in sequential]
    if counts[0] != counts[1] or min(counts[0]) < 1:
        raise StatsError(f"images per id group differ between the sets ({counts[0]} vs {counts[1]}) or a group is "
                         "empty: not the same sample ids")
    fid_p, loo_p = _jackknife(plan, reference, image_size, "plan samples")
    fid_s, loo_s = _jackknife(sequential, reference, image_size, "sequential samples")
    return FidDifference(fid_s, fid_p, _se(loo_s), _se(loo_p), fid_p - fid_s, _se(loo_p - loo_s), sum(counts[0]),
                         len(plan), reference.extractor)
