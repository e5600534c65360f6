"""Reference statistics in the forms users bring (a torchmetrics FID state as published with TarFlow,
ADM/TTUR mu-sigma .npz), built from the real libraries' objects, and the metrics of the same pass:
Inception Score (exact, one split) and KID (torch-fidelity's estimator on a strided subset)."""
import numpy as np
import pytest
import torch
import torch_fidelity
from torch_fidelity.metric_isc import isc_features_to_metric

from workflows.config import FidSettings, Resources
from workflows.fidelity.extractors import build_extractor, extract, register_extractors
from workflows.fidelity.metrics import ISCStats, KeptFeatures, kid_stride
from workflows.fidelity.stats import StatsError, StatsMismatchError, load_stats
from workflows.stages.fid import FeaturePool, check_reference, evaluate_fid, reference_stats

from fid_data import UInt8Images, write_shards


@pytest.fixture(scope="module")
def own_stats(ray_local, shard_sets):
    """The project's statistics of both sets, and the FID between them."""
    with FeaturePool(FidSettings(), Resources(actors=2)) as pool:
        a, b = pool.stats(shard_sets[0]), pool.stats(shard_sets[1])
    from workflows.fidelity.stats import frechet_distance

    return a, b, frechet_distance(a, b)


class DigitFeatures(torch.nn.Module):
    """The mnist5k-classifier extractor as torchmetrics takes a custom feature network."""

    num_features = 64

    def __init__(self):
        super().__init__()
        self.extractor = build_extractor("mnist5k-classifier")

    def forward(self, x):
        return self.extractor(x)[0]


def test_torchmetrics_fid_state_loads_as_published_and_gives_the_same_fid(ray_local, shard_sets, own_stats, digits_u8,
                                                                          tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=DigitFeatures(), normalize=False)
    metric.persistent(True)  # the published files are the metric's state_dict with its feature sums
    images = torch.from_numpy(digits_u8[1]).permute(0, 3, 1, 2).expand(-1, 3, -1, -1)
    for batch in images.split(64):
        metric.update(batch, real=True)
    path = tmp_path / "digits_28_fid_stats.pth"  # the published naming: <dataset>_<size>_fid_stats.pth
    torch.save(metric.state_dict(), path)

    loaded = load_stats(path, "mnist5k-classifier")
    assert (loaded.count, loaded.image_size, loaded.extractor) == (300, (28, 28), "mnist5k-classifier")
    ours, ref, fid = own_stats
    # torchmetrics ran the classifier in batches of 64, our reference in shards of 100: the same features to
    # float32 rounding (other batch sizes order sums differently), so mu to a few float32 ulps of the largest
    np.testing.assert_allclose(loaded.mu, ref.mu, rtol=0, atol=8 * np.finfo(np.float32).eps * np.abs(ref.mu).max())
    settings = FidSettings(reference_extractor="mnist5k-classifier")
    result = evaluate_fid(shard_sets[0], str(path), settings, cache_dir=None, write_result=False)
    assert result.fid == pytest.approx(fid, rel=1e-5)
    assert result.kid is None and any("hold no features" in n for n in result.notes)

    # and torchmetrics' own FID over the same two sets agrees
    for batch in torch.from_numpy(digits_u8[0]).permute(0, 3, 1, 2).expand(-1, 3, -1, -1).split(64):
        metric.update(batch, real=False)
    assert float(metric.compute()) == pytest.approx(fid, rel=1e-4)

    # without the extractor stated, a torchmetrics file means torch-fidelity's Inception: refused against digits
    with pytest.raises(StatsMismatchError, match="inception-v3-compat"):
        check_reference(str(path), FidSettings())
    unnamed = tmp_path / "digits.pth"
    unnamed.write_bytes(path.read_bytes())
    with pytest.raises(StatsError, match="does not say the image size.*--reference-image-size"):
        load_stats(unnamed)
    assert load_stats(unnamed, "mnist5k-classifier", 28).image_size == (28, 28)
    with pytest.raises(StatsMismatchError, match="32x32 images, the samples are 28x28"):
        check_reference(str(unnamed), settings.model_copy(update={"reference_image_size": 32}), 28)
    torch.save({"fake_features_sum": torch.zeros(3)}, tmp_path / "other_28_fid_stats.pth")
    with pytest.raises(StatsError, match="not a torchmetrics FrechetInceptionDistance state: it lacks real_feat"):
        load_stats(tmp_path / "other_28_fid_stats.pth")


def test_adm_mu_sigma_npz_is_refused_without_its_maker_and_equal_with(ray_local, shard_sets, own_stats, tmp_path):
    _, ref, fid = own_stats
    path = tmp_path / "VIRTUAL_digits.npz"
    np.savez(path, mu=ref.mu.astype(np.float32), sigma=ref.sigma)  # as ADM's evaluation suite ships them
    with pytest.raises(StatsError, match="only mu and sigma.*--reference-extractor, --reference-image-size"):
        evaluate_fid(shard_sets[0], str(path), FidSettings(), cache_dir=None, write_result=False)
    settings = FidSettings(reference_extractor="mnist5k-classifier", reference_image_size=28)
    result = evaluate_fid(shard_sets[0], str(path), settings, cache_dir=None, write_result=False)
    assert result.fid == pytest.approx(fid, rel=1e-5)  # mu stored in float32, as those files hold it
    assert result.reference_count is None and "? reference images" in result.text()
    stats, where = reference_stats(str(path), settings, (28, 28))
    assert where == str(path) and stats.count is None
    np.savez(tmp_path / "junk.npz", x=np.zeros(3))
    with pytest.raises(StatsError, match="not FID statistics"):
        load_stats(tmp_path / "junk.npz")


def test_inception_score_is_exact_over_merged_parts(ray_local, shard_sets, digits_u8):
    logits = np.random.default_rng(0).normal(0, 3, (500, 10))
    merged = ISCStats.of(logits[:77]) + ISCStats.of(logits[77:300]) + ISCStats.of(logits[300:])
    theirs = isc_features_to_metric(torch.from_numpy(logits), splits=1)["inception_score_mean"]
    assert merged.score() == pytest.approx(theirs, rel=1e-12)

    result = evaluate_fid(shard_sets[0], shard_sets[1], FidSettings(), cache_dir=None, write_result=False)
    register_extractors()
    metrics = torch_fidelity.calculate_metrics(input1=UInt8Images(digits_u8[0]), isc=True, isc_splits=1, cuda=False,
                                               feature_extractor="mnist5k-classifier", verbose=False, cache=False,
                                               save_cpu_ram=True)
    assert result.inception_score == pytest.approx(metrics["inception_score_mean"], rel=1e-6)
    assert 1.0 < result.inception_score <= 10.0  # ten classes


def test_kid_equals_torch_fidelity_and_keeps_the_same_subset_however_split(ray_local, shard_sets, digits_u8, tmp_path):
    every = FidSettings(kid_samples=10_000)  # more than the set: every feature kept, so every subset is the set
    result = evaluate_fid(shard_sets[0], shard_sets[1], every, cache_dir=None, write_result=False)
    register_extractors()
    metrics = torch_fidelity.calculate_metrics(input1=UInt8Images(digits_u8[0]), input2=UInt8Images(digits_u8[1]),
                                               kid=True, kid_subset_size=300, cuda=False, verbose=False,
                                               feature_extractor="mnist5k-classifier", cache=False, save_cpu_ram=True)
    assert result.kid.kid_subset_size == 300 and result.kid.kid_features == [300, 300]
    assert result.kid.kid_mean == pytest.approx(metrics["kernel_inception_distance_mean"], rel=1e-5)

    # a strided subset: at most kid_samples rows, the same rows (by index) for another shard size
    resharded = write_shards(tmp_path / "resharded", digits_u8[0], 33)
    few = FidSettings(kid_samples=64)
    with FeaturePool(few, Resources(actors=2)) as pool:
        (a, _), (b, _) = pool.run(shard_sets[0]), pool.run(resharded)
    stride = kid_stride(300, 64)
    assert stride == 5 and list(a.kid.index) == list(range(0, 300, stride)) == list(b.kid.index)
    # the same rows; their values to float32 rounding only: shards of 100 and 33 run the classifier in other
    # batch sizes, whose kernels order sums differently (small batches differ in the last bits today)
    full = extract(build_extractor("mnist5k-classifier"), digits_u8[0])[0]
    rounding = 8 * np.finfo(np.float32).eps * np.abs(full).max()
    np.testing.assert_allclose(a.kid.features, b.kid.features, rtol=0, atol=rounding)
    np.testing.assert_allclose(a.kid.features, full[::stride], rtol=0, atol=rounding)
    one, two = evaluate_fid(shard_sets[0], shard_sets[1], few, cache_dir=tmp_path, write_result=False), \
        evaluate_fid(resharded, shard_sets[1], few, cache_dir=tmp_path, write_result=False)
    assert (one.kid.kid_subset_size, one.kid.kid_subsets, one.kid.kid_features) == \
        (two.kid.kid_subset_size, two.kid.kid_subsets, two.kid.kid_features) and one.kid.kid_features == [60, 60]
    assert one.kid.kid_mean == pytest.approx(two.kid.kid_mean, rel=1e-5, abs=1e-9)
    assert one.kid.kid_std == pytest.approx(two.kid.kid_std, rel=1e-5, abs=1e-9)
    assert load_stats(one.reference_stats).kid.features.shape == (60, 64)  # the cache keeps KID's subset

    merged = KeptFeatures.of(full[100:], 100, 7) + KeptFeatures.of(full[:100], 0, 7)  # arrival order is irrelevant
    assert list(merged.index) == list(range(0, 300, 7))
