"""The paired FID comparison (`workflows.fidelity.paired`): its leave-one-group-out statistics are those of the
remaining images, its standard error matches the spread of FID over independent sample sets (also where labels
are a rule of the id), and a difference between two sets of the same ids is known far better than either FID."""
import numpy as np
import pytest

from workflows.fidelity.paired import FidDifference, id_groups, paired_fid
from workflows.fidelity.stats import FeatureStats, FIDStats, StatsError, frechet_distance

DIM, SIZE = 6, (8, 8)


def _reference(rng) -> FIDStats:
    x = rng.normal(size=(20000, DIM))
    return FIDStats.from_features(FeatureStats.of(x), "mnist5k-classifier", SIZE, "reference")


def _groups(x: np.ndarray, k: int) -> list[FeatureStats]:
    """Per-group statistics of a set whose row i is sample id i, as a FID pass keeps them."""
    group = id_groups(np.arange(len(x)), len(x), k)
    return [FeatureStats.of(x[group == g]) for g in range(k)]


def _fid(x: np.ndarray, ref: FIDStats) -> float:
    return frechet_distance(FIDStats.from_features(FeatureStats.of(x), ref.extractor, SIZE, "x"), ref)


def test_a_group_taken_out_leaves_the_statistics_of_the_other_images():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, DIM)) + 0.3
    total, part = FeatureStats.of(x), FeatureStats.of(x[::5])
    rest = total - part
    kept = np.delete(x, np.s_[::5], axis=0)
    assert rest.count == len(kept)
    np.testing.assert_allclose(rest.sigma, np.cov(kept, rowvar=False), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rest.mu, kept.mean(axis=0), rtol=1e-12)
    with pytest.raises(StatsError, match="cannot take 60"):
        part - FeatureStats.of(rng.normal(size=(60, DIM)))


def test_the_jackknife_error_is_the_spread_of_fid_over_independent_sets():
    """30 independent sets of 400 images: the standard deviation of their FIDs (what the error should say) and the
    mean jackknife error of each set agree within sampling error (a wrong formula, e.g. without (K-1)/K under
    the root or the root of the plain variance of leave-one-out values, misses by 3x or more)."""
    rng = np.random.default_rng(1)
    ref = _reference(rng)
    fids, errors = [], []
    for _ in range(30):
        x = rng.normal(size=(400, DIM)) * 1.2 + 0.2
        d = paired_fid(_groups(x, 10), _groups(x, 10), ref, SIZE)
        fids.append(d.fid_plan)
        errors.append(d.plan_se)
        assert d.fid_plan == pytest.approx(_fid(x, ref), rel=1e-9), "the full-set FID is the set's FID"
    spread = np.std(fids, ddof=1)
    assert 0.6 < np.mean(errors) / spread < 1.6, (np.mean(errors), spread)


def test_the_error_holds_where_labels_are_a_rule_of_the_id():
    """Labels cycle with the id (`uniform`: label = id mod 10), and each class has its own features: the error must
    still be the spread over independent sets of the same labels. Groups of id mod 10 (one class each) overstate
    it about 15x; a shuffle of the ids into groups (random class counts) about 2x."""
    rng = np.random.default_rng(4)
    ref = _reference(rng)
    centers = rng.normal(scale=3.0, size=(10, DIM))
    ids = np.arange(500)

    def draw():
        return centers[ids % 10] + rng.normal(size=(len(ids), DIM))

    fids, errors = [], []
    for _ in range(30):
        d = paired_fid(_groups(x := draw(), 10), _groups(x, 10), ref, SIZE)
        fids.append(d.fid_plan)
        errors.append(d.plan_se)
    spread = np.std(fids, ddof=1)
    assert 0.6 < np.mean(errors) / spread < 1.6, (np.mean(errors), spread)
    by_class = [FeatureStats.of(x[ids % 10 == g]) for g in range(10)]
    assert paired_fid(by_class, by_class, ref, SIZE).plan_se > 3 * spread, "the trap this grouping avoids"
    assert np.bincount(id_groups(ids, len(ids), 10)).tolist() == [50] * 10
    assert np.bincount(id_groups(np.arange(12), 12, 10), minlength=10).min() >= 1, "no group empty where K <= N"


def test_same_ids_drawn_two_close_ways_have_a_difference_far_better_known_than_either_fid():
    rng = np.random.default_rng(2)
    ref = _reference(rng)
    x = rng.normal(size=(500, DIM)) + 0.25
    y = x + rng.normal(scale=0.01, size=x.shape)  # a plan a hair from sequential on every sample
    d = paired_fid(_groups(y, 10), _groups(x, 10), ref, SIZE)
    assert isinstance(d, FidDifference) and d.sample_count == 500 and d.groups == 10
    assert d.fid_sequential == pytest.approx(_fid(x, ref), rel=1e-9)
    assert d.difference == pytest.approx(_fid(y, ref) - _fid(x, ref), rel=1e-6)
    assert d.difference_se < d.sequential_se / 10
    assert d.within_noise()
    same = paired_fid(_groups(x, 10), _groups(x, 10), ref, SIZE)
    assert same.difference == 0 and same.difference_se == 0
    # a plan that shifts every image is beyond the noise, and says so
    worse = paired_fid(_groups(x + 0.3, 10), _groups(x, 10), ref, SIZE)
    assert worse.difference > 0 and not worse.within_noise()
    assert FidDifference.from_json(worse.to_json()) == worse


def test_sets_of_other_ids_are_refused():
    rng = np.random.default_rng(3)
    ref = _reference(rng)
    x = rng.normal(size=(40, DIM))
    with pytest.raises(StatsError, match="not the same sample ids"):
        paired_fid(_groups(x, 10), _groups(x[:39], 10), ref, SIZE)
    with pytest.raises(StatsError, match="the same K >= 2 groups"):
        paired_fid(_groups(x, 10), _groups(x, 5), ref, SIZE)
