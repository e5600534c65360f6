"""Files from users are data, never code: every option and config field that takes a file is given a pickle
that would create a marker file if anything unpickled it, and a TorchScript program where data is expected.
Each is refused with a message; the marker never appears."""
import os
import pickle

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import make_tiny_model

from tarflow import Jacobi, Plan
from workflows.cli import main


class Bomb:
    """Unpickling this creates `path`: proof that a file was run as code instead of read as data."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny8x8_checkpoint_path):
    root = tmp_path_factory.mktemp("untrusted")
    marker = root / "EXECUTED"
    bomb = Bomb(marker)
    ckpt = tiny8x8_checkpoint_path
    plan = Plan.uniform(4, 16, Jacobi(tol=1e-5)).save(root / "plan.json")
    f = {"root": root, "marker": marker, "ckpt": ckpt, "plan": plan}
    # torch files: a raw checkpoint, extractor weights, a torchmetrics-style statistics state, a training state
    torch.save({"var": bomb}, root / "ckpt.pth")
    torch.save({"Conv2d_1a_3x3.conv.weight": bomb}, root / "weights.pth")
    torch.save({"real_features_sum": bomb}, root / "stats_28_fid_stats.pth")
    torch.save({"real_features_sum": bomb}, root / "stats_28_fid_stats.pt")
    torch.save({"version": bomb}, root / "resume.safetensors.state.pt")
    # numpy: an object array in an .npz is a pickle
    np.savez(root / "stats.npz", mu=np.array([bomb], dtype=object), sigma=np.eye(2))
    # JSON files (plans, profiles, report data) holding a pickle instead of JSON
    for name in ("bomb-plan.json", "bomb-profile.json", "bomb-report.json"):
        (root / name).write_bytes(pickle.dumps(bomb))
    # YAML with a tag that would run a function
    tag = f"!!python/object/apply:builtins.open [{str(marker)!r}, w]"
    (root / "run.yaml").write_text(f"output: {root / 'out'}\nname: {tag}\n")
    (root / "nightly.yaml").write_text(f"history: h\noutput: o\nmodels: [{{config: {tag}}}]\n")
    # image folders with a pickle named as an image: calibration data and FID samples
    for folder in ("data/class0", "images"):
        (root / folder).mkdir(parents=True)
        (root / folder / "0.png").write_bytes(pickle.dumps(bomb))
    # TorchScript programs where data is expected
    script = torch.jit.script(torch.nn.Linear(2, 2))
    for name in ("script.pth", "script_28_fid_stats.pt", "script-weights.pth"):
        script.save(str(root / name))
    run = {"model": {"checkpoint": str(ckpt)}, "plan": {"path": str(plan)},
           "fid": {"enabled": False}}
    configs = {"checkpoint": {"model": {"checkpoint": str(root / "ckpt.pth")}},
               "plan": {"plan": {"path": str(root / "bomb-plan.json")}},
               "calibration": {"plan": {"tol": 1e-3}, "calibration": {"data": str(root / "data")}},
               "reference": {"fid": {"reference": str(root / "stats_28_fid_stats.pth")}},
               "reference-npz": {"fid": {"reference": str(root / "stats.npz"),
                                         "reference_extractor": "mnist5k-classifier", "reference_image_size": 8}},
               "weights": {"fid": {"extractor": "inception-v3-compat", "weights": str(root / "weights.pth"),
                                   "reference": str(root / "data")}}}
    for name, patch in configs.items():
        (root / f"run-{name}.yaml").write_text(yaml.safe_dump({"output": str(root / f"never-{name}"), **run, **patch}))
    return {k: str(v) for k, v in f.items()}


GEN = ["--num-samples", "4", "--batch-size", "2", "--out", "{r}/g"]
CASES = {
    # options
    "sample --checkpoint": (["sample", "--checkpoint", "{r}/ckpt.pth", "--in-channels", "1", "--out", "{r}/s.png"],
                            "io.open"),
    "profile --checkpoint": (["profile", "--checkpoint", "{r}/ckpt.pth", "--out", "{r}/p.json"], "io.open"),
    "generate --checkpoint": (["generate", "--checkpoint", "{r}/ckpt.pth", *GEN], "io.open"),
    "plan --checkpoint": (["plan", "--hand", "1-2-8-4", "--checkpoint", "{r}/ckpt.pth", "--out", "{r}/x.json"],
                          "io.open"),
    "plan --profile": (["plan", "--profile", "{r}/bomb-profile.json", "--out", "{r}/x.json"],
                       "cannot read the profile"),
    "generate --plan": (["generate", "--checkpoint", "{ckpt}", "--plan", "{r}/bomb-plan.json", *GEN],
                        "cannot read the plan"),
    "sample --plan": (["sample", "--checkpoint", "{ckpt}", "--plan", "{r}/bomb-plan.json", "--out", "{r}/s.png"],
                      "cannot read the plan"),
    "profile --data": (["profile", "--checkpoint", "{ckpt}", "--data", "{r}/data", "--out", "{r}/p.json"],
                       "not a readable image"),
    "train --resume": (["train", "--resume", "{r}/resume.safetensors"], "io.open"),
    "fid --reference .pth": (["fid", "--samples", "{r}/images", "--reference", "{r}/stats_28_fid_stats.pth"],
                             "io.open"),
    "fid --reference .pt": (["fid", "--samples", "{r}/images", "--reference", "{r}/stats_28_fid_stats.pt"],
                            "io.open"),
    "fid --reference .npz": (["fid", "--samples", "{r}/images", "--reference", "{r}/stats.npz", "--reference-extractor",
                              "mnist5k-classifier", "--reference-image-size", "28"], "pickle"),
    "fid --extractor-weights": (["fid", "--samples", "{r}/images", "--reference", "mnist5k", "--extractor",
                                 "inception-v3-compat", "--extractor-weights", "{r}/weights.pth"], "io.open"),
    "fid --samples": (["fid", "--samples", "{r}/images", "--reference", "mnist5k"], "cannot identify image file"),
    "report --data": (["report", "--data", "{r}/bomb-report.json", "--out", "{r}/rep"], "report data"),
    "run CONFIG": (["run", "{r}/run.yaml"], "could not determine a constructor for the tag"),
    "nightly CONFIG": (["nightly", "{r}/nightly.yaml"], "could not determine a constructor for the tag"),
    # run config fields
    "model.checkpoint": (["run", "{r}/run-checkpoint.yaml"], "io.open"),
    "plan.path": (["run", "{r}/run-plan.yaml"], "cannot read the plan"),
    "calibration.data": (["run", "{r}/run-calibration.yaml"], "not a readable image"),
    "fid.reference .pth": (["run", "{r}/run-reference.yaml"], "io.open"),
    "fid.reference .npz": (["run", "{r}/run-reference-npz.yaml"], "pickle"),
    "fid.weights": (["run", "{r}/run-weights.yaml"], "io.open"),
}


@pytest.mark.parametrize("case", CASES)
def test_no_file_from_a_user_is_ever_run_as_code(files, ray_local, case):  # some cases reach a Ray stage
    args, message = CASES[case]
    args = [a.format(r=files["root"], ckpt=files["ckpt"]) for a in args]
    result = CliRunner().invoke(main, args)
    where = f"{' '.join(args)}\n{result.output}"
    assert not os.path.exists(files["marker"]), f"a file was unpickled as code: {where}"
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), f"{where}\n{result.exception!r}"
    assert message in " ".join(result.output.split()), where
    if args[0] == "run" and case not in ("run CONFIG", "calibration.data"):  # the profile stage reads its data
        assert not os.path.exists(yaml.safe_load(open(args[1]))["output"]), "a refused run writes nothing"


def test_every_command_that_reads_a_file_is_covered():
    assert {args[0] for args, _ in CASES.values()} >= {"sample", "profile", "generate", "plan", "train", "fid",
                                                        "report", "run", "nightly"}


def test_the_extractor_cache_of_a_library_is_read_as_data_too(files, tmp_path, monkeypatch):
    """Without --extractor-weights, inception-v3-compat's weights come from torch hub's cache: read with
    weights_only as well (torch-fidelity would unpickle the cached file)."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    from workflows.fidelity.extractors import build_extractor

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.save({"fc.weight": Bomb(files["marker"])}, cached)
    with pytest.raises(ValueError, match="io.open"):
        build_extractor("inception-v3-compat")
    assert not os.path.exists(files["marker"])


@pytest.mark.parametrize("args, status, message", [
    (["sample", "--checkpoint", "{r}/script.pth", "--out", "{r}/s.png"], 1, "TorchScript program, i.e. code"),
    (["fid", "--samples", "{r}/images", "--reference", "{r}/script_28_fid_stats.pt"], 1, "TorchScript program"),
    (["fid", "--samples", "{r}/images", "--reference", "mnist5k", "--extractor", "inception-v3-compat",
      "--extractor-weights", "{r}/script-weights.pth"], 1, "TorchScript program"),
    (["fid", "--samples", "{r}/images", "--reference", "mnist5k", "--extractor", "inception-v3-torchscript",
      "--extractor-weights", "{r}/script-weights.pth"], 2,
     "Invalid value for '--extractor-weights': extractor inception-v3-torchscript takes no weights file"),
    (["fid", "--samples", "{r}/images", "--reference", "mnist5k", "--extractor-weights", "{r}/weights.pth"], 2,
     "Invalid value for '--extractor-weights': extractor mnist5k-classifier takes no weights file"),
])
def test_a_torchscript_program_is_refused_where_data_is_expected(files, args, status, message):
    result = CliRunner().invoke(main, [a.format(r=files["root"]) for a in args])
    assert result.exit_code == status and isinstance(result.exception, SystemExit), result.output
    assert message in " ".join(result.output.split()), result.output


# ---- every number in a file is checked by its model -------------------------------------------------------------

@pytest.mark.parametrize("tol", [-1.0, 0.0, float("nan"), float("inf")])
def test_a_plans_tol_is_the_one_certified_tolerance_rule(tol):
    """The tolerance a plan is certified for follows the scheduler's and a run config's rule: finite, > 0."""
    from tarflow import PlanError

    d = Plan.sequential(2, 16).to_dict()
    with pytest.raises(PlanError, match=f"plan.tol={tol!r}: must be a finite number > 0 or null"):
        Plan.from_dict({**d, "tol": tol})


@pytest.fixture(scope="module")
def profile_dict():
    import json

    from tarflow import SamplingSpec
    from tarflow.profile import profile_model

    prof = profile_model(make_tiny_model(num_blocks=2), SamplingSpec(batch_size=1), num_images=1, segment_lens=[15],
                         windows=[], tols=[1e-2], caps=[1], repeats=1)
    return json.loads(prof.to_json())


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(seconds=-1.0), r"profile.seconds=-1.0: must be a finite number >= 0"),
    (lambda d: d.update(threads=0), r"profile.threads=0: must be a positive integer"),
    (lambda d: d.update(tols=[0.0]), r"profile.tols=\[0.0\]: every tolerance must be > 0"),
    (lambda d: d.update(caps=[0]), r"profile.caps\[0\]=0: must be a positive integer"),
    (lambda d: d["calibration"].update(num_images=0), r"profile.calibration.num_images=0: must be a positive integer"),
    (lambda d: d["blocks"][0].update(crm_share=1.5), r"profile.blocks\[0\].crm_share=1.5: a share is in \[0, 1\]"),
    (lambda d: d["blocks"][0].update(sequential_step_seconds=-1e-3), r"blocks\[0\].sequential_step_seconds=-0.001"),
    (lambda d: d["blocks"][0]["pass_seconds"].update({"15": -2.0}), r"blocks\[0\].pass_seconds\[15\]=-2.0"),
    (lambda d: d["blocks"][0]["igm"].update(z=-1.0), r"blocks\[0\].igm.z=-1.0: must be a finite number >= 0"),
    (lambda d: d["blocks"][0]["crm_terms"].update(scale_weight=-1.0), r"blocks\[0\].crm_terms.scale_weight=-1.0"),
    (lambda d: d["blocks"][0]["convergence"][0].update(passes=-1.0),
     r"convergence\[0\].passes=-1.0: must be a finite number >= 0"),
    (lambda d: d["blocks"][0]["convergence"][0].update(error=-1e-3),
     r"convergence\[0\].error=-0.001: must be a finite number >= 0"),
])
def test_every_number_of_a_profile_is_range_checked(profile_dict, edit, message):
    import copy

    from tarflow.profile import Profile, ProfileError

    d = copy.deepcopy(profile_dict)
    edit(d)
    with pytest.raises(ProfileError, match=message):
        Profile.from_dict(d)


@pytest.mark.parametrize("patch, message", [
    ({"n": 1}, "count=1, a covariance needs at least 2 images"),
    ({"image_size": [28]}, r"image_size=\(28,\), not a positive \(H, W\)"),
    ({"image_size": [28, 0]}, r"image_size=\(28, 0\), not a positive \(H, W\)"),
    ({"kid_index": np.arange(3), "kid_features": np.zeros((3, 5))}, r"KID's kept features are \(3, 5\)"),
    ({"kid_index": np.arange(2), "kid_features": np.full((2, 4), np.nan)}, r"KID's kept features"),
    ({"sigma": np.eye(3)}, r"sigma has shape \(3, 3\), mu has 4 features"),
])
def test_every_number_of_a_statistics_file_is_checked(tmp_path, patch, message):
    from workflows.fidelity.stats import StatsError, load_stats

    fields = {"mu": np.zeros(4), "sigma": np.eye(4), "n": 10, "extractor": "mnist5k-classifier",
              "image_size": [28, 28], "dataset": "x", **patch}
    np.savez(tmp_path / "s.npz", **fields)
    with pytest.raises(StatsError, match=message):
        load_stats(tmp_path / "s.npz")


def test_a_weights_file_only_for_the_extractor_that_takes_one():
    from tarflow.schema import validate
    from workflows.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="fid.weights: extractor inception-v3-torchscript takes no weights file"):
        validate(RunConfig, {"output": "o", "fid": {"extractor": "inception-v3-torchscript", "weights": "w.pt"}},
                 "", ConfigError)


# ---- a hostile output, unbounded inputs, impossible numbers, silent corruption, waits ----------------------------
# (the third adversarial pass: each class below once ended in a write outside the output, a traceback, a hang, or a
# wrong number; see tests/README.md)

def _invoke(args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result, " ".join(result.output.split())


def _generate_args(out, *extra):
    return ["generate", "--checkpoint", "demo", "--num-samples", "4", "--batch-size", "4", "--out", out, *extra]


def test_a_link_planted_as_the_lease_is_never_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "_lease.json").symlink_to(victim)
    result, output = _invoke(_generate_args(tmp_path / "out"))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), output
    assert "_lease.json is a symbolic link" in output and "never through a link" in output, output
    assert victim.read_text() == "precious\n"


def test_a_link_planted_as_a_folder_of_the_output_is_never_written_through(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ".x.tmp-abc").write_text("not ours")  # what a clean-up of temporaries would delete
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "data").symlink_to(elsewhere)
    result, output = _invoke(_generate_args(tmp_path / "out"))
    assert result.exit_code == 1, output
    assert "out/data is a symbolic link" in output, output
    assert sorted(p.name for p in elsewhere.iterdir()) == [".x.tmp-abc"]


def test_every_local_writer_stays_inside_its_folder(tmp_path):
    """The store layer's writes, deletes and the report: a link below the folder is refused; a link as the file
    itself is replaced (renamed over), its target untouched. `tarflow`'s own writes (plans, checkpoints) too."""
    from tarflow.atomic import write_atomic as write_local
    from workflows.report import ReportData, write_report
    from workflows.storage import files

    elsewhere, out = tmp_path / "elsewhere", tmp_path / "out"
    elsewhere.mkdir()
    out.mkdir()
    (out / "sub").symlink_to(elsewhere)
    fs, base = files.resolve(str(out))
    with pytest.raises(files.LinkError, match="sub is a symbolic link"):
        files.write_below(fs, base, "sub/f.json", b"{}")
    with pytest.raises(files.LinkError, match="sub is a symbolic link"):
        files.remove_temporaries(fs, base, "sub")
    assert list(elsewhere.iterdir()) == []

    victim = tmp_path / "victim.txt"
    for name in ("f.json", "report.html"):
        victim.write_text("precious")
        (out / name).symlink_to(victim)
        if name == "f.json":
            files.write_below(fs, base, name, b"{}")
        else:
            write_report(ReportData("t"), out)
        assert victim.read_text() == "precious" and not (out / name).is_symlink()
    (out / "plan.json").symlink_to(victim)
    (out / f".plan.json.tmp-{os.getpid()}").symlink_to(victim)  # the temporary's old, predictable name
    Plan.sequential(2, 16).save(out / "plan.json")
    assert victim.read_text() == "precious" and Plan.load(out / "plan.json").num_blocks == 2


@pytest.fixture(scope="module")
def checkpoint_parts(tiny8x8_checkpoint_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(tiny8x8_checkpoint_path), framework="pt") as f:
        meta = f.metadata()
    return load_file(str(tiny8x8_checkpoint_path)), meta


@pytest.mark.timeout(60)  # before the fix, 10**7 blocks were built for minutes while memory grew
@pytest.mark.parametrize("patch, message", [
    ({"config": {"num_blocks": 10**7}}, "num_blocks=10000000 .the tensors are 4."),
    ({"config": {"channels": 2**30}}, "channels=1073741824 .the tensors are 64."),
    ({"config": {"num_blocks": "four"}}, "num_blocks='four', not an integer"),
    ({"config": {"nvp": 1}}, "nvp=1, not true or false"),
    ({"config": {"heads": 4}}, "unknown field.s. heads"),
    ({"config": "[" * 100_000}, "nests lists and objects more than 32 deep"),
    ({"config": "{not json"}, "the config in its metadata is not valid JSON"),
    ({"provenance": "not json"}, "the provenance in its metadata is not valid JSON"),
    ({"provenance": "[1, 2]"}, "the provenance in its metadata is list, not an object"),
    ({"version": "x"}, "format version 'x'; this build reads 1 to 1"),
    ({"version": "2"}, "format version '2'"),
])
def test_every_size_a_checkpoint_claims_is_checked_against_its_tensors(tmp_path, checkpoint_parts, patch, message):
    import json

    from safetensors.torch import save_file

    from tarflow import CheckpointError, load_checkpoint

    state, meta = checkpoint_parts
    meta = dict(meta)
    for key, value in patch.items():
        meta[key] = json.dumps({**json.loads(meta["config"]), **value}) if isinstance(value, dict) else value
    save_file(state, str(tmp_path / "m.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "m.safetensors")


def test_a_sample_count_beyond_what_a_set_holds_is_refused_before_anything_is_made(tmp_path):
    result, output = _invoke(["generate", "--checkpoint", "demo", "--num-samples", str(10**12), "--batch-size", "4",
                              "--out", tmp_path / "out"])
    assert result.exit_code == 2 and "Invalid value for '--num-samples'" in output, output
    assert "a set holds at most 100000 shards" in output
    assert not (tmp_path / "out").exists()
    result, output = _invoke(["generate", "--checkpoint", "demo", "--num-samples", "4", "--batch-size", str(10**6),
                              "--out", tmp_path / "out"])
    assert result.exit_code == 2 and "Invalid value for '--batch-size'" in output and "[1, 65536]" in output, output


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("reader", ["plan", "profile", "manifest", "record", "lease", "report data", "config"])
def test_every_json_and_yaml_reader_bounds_nesting(tmp_path, reader):
    """100,000 levels (and 33): refused with the bound named, never a RecursionError."""
    from tarflow import PlanError
    from tarflow.profile import Profile, ProfileError
    from tarflow.schema import MAX_NESTING, SchemaError
    from workflows.config import ConfigError, RunConfig
    from workflows.report import ReportData
    from workflows.storage import shards as sh
    from workflows.storage.lease import _holder_of

    for depth in (100_000, MAX_NESTING + 1):
        text = _deep(depth)
        if reader == "lease":
            assert "nests lists and objects more than 32 deep" in _holder_of(text.encode()).unreadable
            continue
        if reader == "config":
            (tmp_path / "run.yaml").write_text(f"output: o\nname: {text}\n")
            call, error = (lambda: RunConfig.load(tmp_path / "run.yaml")), ConfigError
        elif reader == "record":
            layout = sh.Manifest({}, 4, 2)
            (tmp_path / sh.RECORDS_DIR).mkdir(exist_ok=True)
            (tmp_path / sh.RECORDS_DIR / "00000.json").write_text(text)
            call, error = (lambda: sh.read_records(str(tmp_path), layout)), sh.ShardError
        else:
            call, error = {"plan": (lambda: Plan.from_json(text), PlanError),
                           "profile": (lambda: Profile.from_json(text), ProfileError),
                           "manifest": (lambda: sh.Manifest.from_json(text), sh.ShardError),
                           "report data": (lambda: ReportData.from_json(text), SchemaError)}[reader]
        with pytest.raises(error, match=f"nests lists and (objects|mappings) more than {MAX_NESTING} deep"):
            call()


def test_a_deeply_nested_manifest_gets_the_recovery_other_corrupt_manifests_get(tmp_path, ray_local):
    out = tmp_path / "out"
    args = _generate_args(out, "--shard-size", "2", "--no-progress")
    assert _invoke(args)[0].exit_code == 0
    (out / "_manifest.json").write_text(_deep(100_000))
    result, output = _invoke(args)
    assert result.exit_code == 0, output
    assert "nests lists and objects more than 32 deep" in output and "recovered 2 shard(s)" in output, output


@pytest.mark.parametrize("sigma, message", [
    (np.diag([1.0, 1.0, 1.0, -600.0]), r"sigma has eigenvalue -600 .largest 1.: a covariance is positive semi"),
    (np.array([[1.0, 0.5, 0, 0], [0.0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), r"sigma is not symmetric"),
])
def test_a_covariance_that_cannot_be_is_refused_and_never_gives_a_fid(tmp_path, sigma, message):
    """Such a sigma once gave `FID: -275.29` (exit 0, saved in the result) or a plausible wrong value."""
    from workflows.fidelity.stats import StatsError, load_stats

    np.savez(tmp_path / "s.npz", mu=np.zeros(4), sigma=sigma, n=10, extractor="mnist5k-classifier",
             image_size=[28, 28], dataset="x")
    with pytest.raises(StatsError, match=message):
        load_stats(tmp_path / "s.npz")


def test_a_covariance_stored_in_float32_is_still_a_covariance(tmp_path):
    """The bound leaves room for float32 storage: a real rank-deficient covariance, rounded, loads."""
    from workflows.fidelity.stats import FeatureStats, load_stats

    x = np.random.default_rng(0).normal(size=(50, 64)) @ np.random.default_rng(1).normal(size=(64, 64))
    stats = FeatureStats.of(x)
    np.savez(tmp_path / "s.npz", mu=stats.mu.astype(np.float32), sigma=stats.sigma.astype(np.float32), n=50,
             extractor="mnist5k-classifier", image_size=[28, 28], dataset="x")
    assert load_stats(tmp_path / "s.npz").count == 50


def test_a_flipped_bit_in_the_history_is_an_error_never_a_number(tmp_path):
    """One bit of a stored speedup once read back 1.48 -> 1.98, and the gate reported a false regression."""
    import struct

    from workflows.storage.history import HistoryError, HistoryRow, append_history, read_history

    row = HistoryRow("2026-01-01T00:00:00", "m", "h", "auto", "p", "cpu", 1, 2.0, 1.0, 1.48, 4, 2, 0.0)
    append_history(str(tmp_path / "h"), [row])
    [stored] = (tmp_path / "h").iterdir()
    data = bytearray(stored.read_bytes())
    at = bytes(data).find(struct.pack("<d", 1.48))
    assert at > 0, "the value is stored as written (uncompressed page)"
    data[at + 6] ^= 0x01
    stored.write_bytes(bytes(data))
    with pytest.raises(HistoryError, match="is corrupt .*CRC checksum verification failed.*restore the file"):
        read_history(str(tmp_path / "h"))


def test_a_cluster_address_where_nothing_listens_is_a_message_before_anything_is_made(tmp_path, monkeypatch):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    result, output = _invoke(_generate_args(tmp_path / "out"))
    assert result.exit_code == 1, output
    assert f"cannot join the Ray cluster at RAY_ADDRESS=127.0.0.1:{port}: nothing answers there" in output, output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tol, message", [("-1", "--tol"), ("nan", "--tol"), ("1e-3", "drop --tol")])
def test_a_hand_plan_refuses_a_tolerance_it_would_ignore(files, tol, message):
    result, output = _invoke(["plan", "--hand", "1-2-8-4", "--checkpoint", files["ckpt"], "--tol", tol,
                              "--out", f"{files['root']}/hand.json"])
    assert result.exit_code == 2 and message in output, output
    assert not os.path.exists(f"{files['root']}/hand.json")


def test_fid_checks_its_samples_before_it_starts_ray(files, monkeypatch):
    import workflows.runtime

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the samples were checked")

    monkeypatch.setattr(workflows.runtime, "connect", refuse)
    bad = os.path.join(files["root"], "bad-set")
    os.makedirs(bad, exist_ok=True)
    with open(os.path.join(bad, "_manifest.json"), "w") as f:
        f.write("{not json")
    result, output = _invoke(["fid", "--samples", bad, "--reference", "mnist5k"])
    assert result.exit_code == 1 and "_manifest.json is corrupt" in output, output
