"""Distributed FID: merged shard statistics against single-process torch-fidelity, reference caching,
mismatch errors, the offline TorchScript Inception and the CLI. Real local Ray, real Parquet."""
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity
from click.testing import CliRunner
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

from workflows.config import FidSettings, Resources
from workflows.fidelity.extractors import build_extractor, export_compat_weights, extract, has_isc, register_extractors
from workflows.fidelity.stats import FeatureStats, FIDStats, StatsError, StatsMismatchError, frechet_distance
from workflows.stages.fid import EvaluateError, FeaturePool, FIDResult, FIDResultError, check_reference, evaluate_fid, \
    reference_stats
from workflows.storage import files, shards as sh

from fid_data import UInt8Images, write_shards


def test_merged_feature_stats_equal_np_cov_and_torch_fidelity():
    features = np.random.default_rng(0).normal(2.0, 3.0, (500, 16)).astype(np.float32)
    merged = FeatureStats.of(features[:123]) + FeatureStats.of(features[123:400]) + FeatureStats.of(features[400:])
    # torch-fidelity's mean keeps its input's dtype: given float64 (the sums ours keeps), its statistics are
    # exact to float64 rounding, so the comparison tests the convention, not numpy's float32 summation order
    single = fid_features_to_statistics(torch.from_numpy(features.astype(np.float64)))
    np.testing.assert_allclose(merged.mu, single["mu"], rtol=1e-12)
    np.testing.assert_allclose(merged.sigma, single["sigma"], rtol=1e-10, atol=1e-12)
    other = np.random.default_rng(1).normal(2.5, 3.0, (400, 16)).astype(np.float32)
    ours = frechet_distance(FIDStats.from_features(merged, "x", (1, 1), "a"),
                            FIDStats.from_features(FeatureStats.of(other), "x", (1, 1), "b"))
    theirs = fid_statistics_to_metric(single, fid_features_to_statistics(torch.from_numpy(other.astype(np.float64))),
                                      False)
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-9)


def test_distributed_fid_over_shards_equals_single_process_torch_fidelity(ray_local, shard_sets, digits_u8):
    samples, shifted = shard_sets
    with FeaturePool(FidSettings(batch_size=64), Resources(actors=2)) as pool:
        a, b = pool.stats(samples), pool.stats(shifted)
    assert (a.count, b.count, a.image_size) == (300, 300, (28, 28))

    register_extractors()
    metrics = torch_fidelity.calculate_metrics(
        input1=UInt8Images(digits_u8[0]), input2=UInt8Images(digits_u8[1]), fid=True, cuda=False,
        feature_extractor="mnist5k-classifier", batch_size=300, verbose=False, cache=False, save_cpu_ram=True)
    # torch-fidelity extracts in one batch of 300 and sums its float32 features in float32: the classifier's
    # features from another batch size differ in their last bits, and its mean by float32 summation (~1e-7)
    assert frechet_distance(a, b) == pytest.approx(metrics["frechet_inception_distance"], rel=1e-5)

    features = extract(build_extractor("mnist5k-classifier"), digits_u8[0])[0]
    single = fid_features_to_statistics(torch.from_numpy(features))
    np.testing.assert_allclose(a.mu, single["mu"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.sigma, single["sigma"], rtol=1e-5, atol=1e-6)


def test_fid_against_itself_is_zero_and_against_shifted_set_larger(ray_local, shard_sets, digits_u8, tmp_path):
    samples, _ = shard_sets
    folder = tmp_path / "shifted" / "any-class"  # the shifted digits as an image folder reference
    folder.mkdir(parents=True)
    for i, image in enumerate(digits_u8[1]):
        (folder / f"{i:04d}.png").write_bytes(sh.encode_png(image))
    cfg = FidSettings()
    same = evaluate_fid(samples, samples, cfg, cache_dir=None, write_result=False)
    moved = evaluate_fid(samples, str(tmp_path / "shifted"), cfg, cache_dir=None, write_result=False)
    assert abs(same.fid) < 1e-6
    assert moved.reference_count == 300 and moved.fid > 1.0


def test_reference_stats_are_saved_reused_and_round_trip(ray_local, shard_sets, tmp_path):
    samples, shifted = shard_sets
    cfg = FidSettings()
    first = evaluate_fid(samples, shifted, cfg, cache_dir=tmp_path)
    assert first.reference_stats and first.reference_stats.startswith(str(tmp_path))
    saved = FIDStats.load(first.reference_stats)
    assert (saved.count, saved.extractor, saved.image_size) == (300, "mnist5k-classifier", (28, 28))

    copy = saved.save(tmp_path / "copy.npz")
    again = FIDStats.load(copy)
    np.testing.assert_array_equal(again.mu, saved.mu)
    np.testing.assert_array_equal(again.sigma, saved.sigma)
    assert again.describe() == saved.describe()

    # a second look-up reads the cache instead of extracting: altered cached statistics come back as they are
    FIDStats(saved.mu + 1.0, saved.sigma, 123, saved.extractor, saved.image_size, saved.dataset).save(
        first.reference_stats)
    cached, cached_path = reference_stats(shifted, cfg, (28, 28), tmp_path)
    assert cached_path == first.reference_stats and cached.count == 123
    np.testing.assert_array_equal(cached.mu, saved.mu + 1.0)
    saved.save(first.reference_stats)
    from_npz = evaluate_fid(samples, str(copy), cfg)
    assert from_npz.fid == pytest.approx(first.fid, rel=1e-12)

    written = json.loads(open(files.resolve(samples)[1] + "/_fid-mnist5k-classifier.json").read())
    assert written["fid"] == pytest.approx(from_npz.fid) and written["sample_count"] == 300


def test_mismatched_extractor_or_image_size_is_an_error(ray_local, shard_sets, tmp_path):
    samples, _ = shard_sets
    stats = FIDStats(np.zeros(64), np.eye(64), 10, "mnist5k-classifier", (28, 28), "mnist5k")
    path = stats.save(tmp_path / "ref.npz")
    # raised before any image is read: on a set whose every shard is corrupt, the mismatch is still what is said
    broken = tmp_path / "broken"
    shutil.copytree(samples, broken)
    for shard in broken.glob("data/train-*.parquet"):
        shard.write_bytes(b"\x00" * shard.stat().st_size)
    with pytest.raises(StatsMismatchError, match="extractor 'mnist5k-classifier'.*inception-v3-torchscript"):
        evaluate_fid(str(broken), str(path), FidSettings(extractor="inception-v3-torchscript"))
    with pytest.raises(sh.ShardError, match="fails its sha256 check"):  # the shards really are unreadable
        evaluate_fid(str(broken), str(path), FidSettings())
    small = FIDStats(np.zeros(64), np.eye(64), 10, "mnist5k-classifier", (8, 8), "digits").save(tmp_path / "s.npz")
    with pytest.raises(StatsMismatchError, match="8x8 images, the samples are 28x28"):
        reference_stats(str(small), FidSettings(), (28, 28))
    with pytest.raises(StatsMismatchError, match="different extractors"):
        frechet_distance(stats, FIDStats(np.zeros(64), np.eye(64), 10, "other", (28, 28), "x"))


def test_corrupt_shard_is_an_error_naming_the_shard(ray_local, tmp_path, digits_u8):
    uri = write_shards(tmp_path / "set", digits_u8[0][:40], 20)
    path = tmp_path / "set" / "data" / "train-00001-of-00002.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(sh.ShardError, match="train-00001-of-00002.parquet fails its sha256 check"):
        evaluate_fid(uri, "mnist5k", FidSettings(), cache_dir=None)


def test_bad_sources_and_settings_are_errors(tmp_path):
    with pytest.raises(EvaluateError, match="neither a shard set"):
        evaluate_fid(str(tmp_path / "missing"), "mnist5k")
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="Input should be 'mnist5k-classifier'"):
        FidSettings(extractor="inception")
    with pytest.raises(FileNotFoundError, match="reference statistics not found"):
        FIDStats.load(tmp_path / "none.npz")


def test_torchscript_inception_runs_offline_and_matches_torch_fidelity_inception(monkeypatch, tmp_path, digits_u8):
    def no_network(*args, **kwargs):
        raise AssertionError("an offline extractor tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    images = digits_u8[0][:8]
    features = extract(build_extractor("inception-v3-torchscript"), images)[0]
    assert features.shape == (8, 2048) and np.isfinite(features).all()
    assert (features >= 0).all() and features.std(axis=0).max() > 0  # pool of ReLUs, and images differ

    # the same weights inside torch-fidelity's own Inception give the same features
    weights = str(export_compat_weights(tmp_path / "inception.pth"))
    compat = build_extractor("inception-v3-compat", weights)
    # two float32 networks of 94 layers computing in their own kernels' order: a few ulps of the largest
    # feature apart (2-3 measured on torch 2.4 and 2.14); 64 ulps bounds that with room (as docs/fid.md says)
    bound = 64 * np.finfo(np.float32).eps * np.abs(features).max()
    np.testing.assert_allclose(extract(compat, images)[0], features, rtol=0, atol=bound)
    # the exported weights have no classifier: no Inception Score rather than a uniform softmax's 1.0
    assert not has_isc(build_extractor("inception-v3-compat", weights, isc=True))
    assert has_isc(build_extractor("mnist5k-classifier", isc=True))


def test_cli_prints_fid_and_writes_json(ray_local, shard_sets, tmp_path):
    from workflows.cli import main

    samples, shifted = shard_sets
    result = CliRunner().invoke(main, ["fid", "--samples", samples, "--reference", shifted, "--actors", "1",
                                       "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "FID: " in result.output and "300 samples" in result.output and "mnist5k-classifier" in result.output
    assert "IS: " in result.output and "KID: " in result.output
    # not a terminal: plain progress lines (one per image set at the end), no bar redraws
    assert "\r" not in result.output and "features (mnist5k-classifier): 300/300 img (100%)" in result.output
    forced = CliRunner().invoke(main, ["fid", "--samples", samples, "--reference", shifted, "--progress",
                                       "--cache-dir", str(tmp_path)])
    assert forced.exit_code == 0 and "\r" in forced.output and "300/300" in forced.output
    text = open(files.resolve(samples)[1] + "/_fid-mnist5k-classifier.json").read()
    written = FIDResult.from_json(text)
    assert written.reference == shifted and written.fid > 1.0 and written.kid.kid_subset_size == 300
    # the file is the last run's (its seconds differ from the first run's): what that run printed
    assert written.text().splitlines()[0] in forced.output and written.to_json() == text

    bad = CliRunner().invoke(main, ["fid", "--samples", samples, "--reference", str(tmp_path / "nothing")])
    assert bad.exit_code != 0 and "neither a shard set" in bad.output

    # --metrics names what the pass computes; an unknown one is refused naming the option
    prc = CliRunner().invoke(main, ["fid", "--samples", samples, "--reference", shifted, "--metrics", "fid,prc"])
    assert prc.exit_code == 0 and "precision: " in prc.output and "KID" not in prc.output, prc.output
    unknown = CliRunner().invoke(main, ["fid", "--samples", samples, "--reference", shifted, "--metrics", "fid,psnr"])
    assert unknown.exit_code == 2 and "Invalid value for '--metrics'" in unknown.output, unknown.output


@pytest.fixture
def unreadable_samples(shard_sets, tmp_path):
    """The samples with every shard's bytes zeroed (same size): any pass that reads one fails on its checksum,
    so an error about anything else was raised before a single sample was read."""
    broken = tmp_path / "broken"
    shutil.copytree(shard_sets[0], broken)
    for shard in broken.glob("data/train-*.parquet"):
        shard.write_bytes(b"\x00" * shard.stat().st_size)
    return str(broken)


@pytest.mark.parametrize("mu, sigma, message", [
    (np.zeros(32), np.eye(32), "have 32 features, extractor mnist5k-classifier gives 64"),
    (np.zeros(64), np.eye(63), r"sigma has shape \(63, 63\), mu has 64 features"),
    (np.full(64, np.nan), np.eye(64), "mu holds NaN or inf"),
    (np.zeros(64), np.full((64, 64), np.inf), "sigma holds NaN or inf"),
])
def test_reference_statistics_are_checked_before_any_sample_is_read(ray_local, unreadable_samples, tmp_path, mu,
                                                                    sigma, message):
    path = tmp_path / "ref.npz"
    np.savez(path, mu=mu, sigma=sigma, n=300, extractor="mnist5k-classifier", image_size=[28, 28], dataset="x")
    with pytest.raises(StatsError, match=message):
        evaluate_fid(unreadable_samples, str(path), FidSettings(), cache_dir=None)
    with pytest.raises(StatsError, match=message):  # and by the run, before generating
        check_reference(str(path), FidSettings(), 28)


def test_a_listed_shard_that_is_gone_is_found_before_the_pass(ray_local, unreadable_samples, shard_sets, tmp_path):
    (Path(unreadable_samples) / "data" / "train-00004-of-00005.parquet").unlink()
    with pytest.raises(sh.ShardError, match="train-00004-of-00005.parquet is listed in the manifest but missing"):
        evaluate_fid(unreadable_samples, "mnist5k", FidSettings(), cache_dir=None)
    # a reference shard set: before the samples' pass, and before the run generates
    with pytest.raises(sh.ShardError, match="train-00004-of-00005.parquet is listed in the manifest but missing"):
        evaluate_fid(shard_sets[1], unreadable_samples, FidSettings(), cache_dir=None)
    with pytest.raises(sh.ShardError, match="is listed in the manifest but missing"):
        check_reference(unreadable_samples, FidSettings(), 28)
    resized = Path(unreadable_samples) / "data" / "train-00001-of-00005.parquet"
    resized.write_bytes(resized.read_bytes()[:-10])
    with pytest.raises(sh.ShardError, match="train-00001-of-00005.parquet has .* bytes, the manifest says"):
        check_reference(unreadable_samples, FidSettings(), 28)


def test_a_fid_that_is_not_finite_is_an_error_not_a_number():
    a = FIDStats(np.zeros(2), np.eye(2), 10, "x", (1, 1), "a")
    b = FIDStats(np.full(2, 1e200), np.eye(2), 10, "x", (1, 1), "b")
    with pytest.raises(StatsError, match="FID of a vs b is inf, not a number"):
        frechet_distance(a, b)


def test_one_extractor_registry_gives_the_configs_and_cli_choices_and_the_docs_table():
    import re
    import typing

    from workflows.cli import main
    from workflows.fidelity.registry import DEFAULT_EXTRACTOR, EXTRACTORS

    assert typing.get_args(FidSettings.model_fields["extractor"].annotation) == tuple(EXTRACTORS)
    assert FidSettings().extractor == DEFAULT_EXTRACTOR
    option = next(p for p in main.commands["fid"].params if p.name == "extractor")
    assert list(option.type.choices) == list(EXTRACTORS) and option.default == DEFAULT_EXTRACTOR
    page = (Path(__file__).resolve().parents[1] / "docs" / "fid.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z0-9-]+)`(?: \(default\))? \| (\d+)-d", page, re.M))
    assert rows == {name: str(info.dim) for name, info in EXTRACTORS.items()}, "docs/fid.md's extractor table"


FID_RESULT = {"fid": 3.5, "extractor": "mnist5k-classifier", "samples": "s", "sample_count": 300, "reference": "r",
              "reference_count": 300, "reference_stats": None, "image_size": [28, 28], "seconds": 2.0,
              "inception_score": 9.1, "kid": {"kid_mean": -0.001, "kid_std": 0.002, "kid_subset_size": 300,
                                              "kid_subsets": 100, "kid_features": [300, 300]}}


@pytest.mark.parametrize("edit, message", [
    ({"fid": float("nan")}, "FID result.fid: Input should be a finite number"),
    ({"sample_count": 0}, "FID result.sample_count=0: must be a positive integer"),
    ({"reference_count": 0}, "FID result.reference_count=0: must be a positive integer or null"),
    ({"image_size": [28]}, "FID result.image_size=[28]: (height, width), each >= 1"),
    ({"seconds": -1.0}, "FID result.seconds=-1.0: must be a finite number >= 0"),
    ({"inception_score": 0.0}, "FID result.inception_score=0.0: must be a finite number > 0 or null"),
    ({"kid": {**FID_RESULT["kid"], "kid_std": -1.0}}, "FID result.kid.kid_std=-1.0: must be a finite number >= 0"),
    ({"kid": {**FID_RESULT["kid"], "kid_subset_size": 301}}, "FID result.kid.kid_subset_size=301: must be an integer in [2, 300]"),
    ({"colour": "red"}, "FID result.colour: unknown field"),
    ({"precision_recall": {"precision": 1.5, "recall": 0.5, "f_score": 0.5, "k": 3, "features": [300, 300]}},
     "FID result.precision_recall.precision=1.5: a share, in [0, 1]"),
    ({"precision_recall": {"precision": 0.5, "recall": 0.5, "f_score": 0.5, "k": 3, "features": [3, 300]}},
     "FID result.precision_recall.features=[3, 300]: two counts, samples and reference images, each more than k=3"),
    ({"inception_score_splits": {"mean": 9.0, "std": -1.0, "splits": 10}},
     "FID result.inception_score_splits.std=-1.0: must be a finite number >= 0"),
])
def test_a_fid_result_is_read_back_typed_and_range_checked(edit, message):
    """The one model of `_fid-<extractor>.json` and the pipeline's FID stage output: what `run` prints is its
    `text`, the lines `fid` prints."""
    from tarflow import SamplingSpec
    from workflows.config import RunConfig
    from workflows.pipeline import RunResult, summary_text

    good = FIDResult.from_json(json.dumps(FID_RESULT))
    assert good.kid.kid_mean == -0.001 and FIDResult.from_json(good.to_json()) == good
    assert good.text() in summary_text(RunResult(RunConfig(output="o"), SamplingSpec(), fid=good))
    with pytest.raises(FIDResultError) as e:
        FIDResult.from_json(json.dumps({**FID_RESULT, **edit}))
    assert message in str(e.value)
