"""Every command, given bad input, ends with a one-paragraph message and a non-zero exit, never a traceback."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import make_tiny_model

from tarflow import GSJacobi, ModelRef, Plan, SamplingSpec, save_checkpoint
from tarflow.profile import profile_model
from workflows.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny8x8_checkpoint_path_with_noise_std):
    root = tmp_path_factory.mktemp("cli-errors")
    ckpt = tiny8x8_checkpoint_path_with_noise_std
    raw = root / "raw.pth"
    torch.save(make_tiny_model().state_dict(), raw)
    plan = Plan.uniform(4, 16, GSJacobi(segment_len=5)).save(root / "plan.json")
    other_plan = Plan.sequential(2, 16).save(root / "other-plan.json")
    prof = profile_model(make_tiny_model(num_blocks=2), SamplingSpec(batch_size=1), num_images=1, segment_lens=[15],
                         windows=[], tols=[1e-2], caps=[1], repeats=1, model_ref=ModelRef(str(ckpt)))
    profile = prof.save(root / "profile.json")
    (root / "corrupt.json").write_text('{"version": 2, "num_blocks": ')
    (root / "binary.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    unknown = json.loads(profile.read_text())
    unknown["colour"] = "red"
    (root / "unknown.json").write_text(json.dumps(unknown))
    (root / "corrupt.yaml").write_text("output: [unclosed\n")
    (root / "unknown.yaml").write_text(yaml.safe_dump({"output": str(root / "o"), "samplng": {}}))
    (root / "range.yaml").write_text(yaml.safe_dump({"output": str(root / "o"), "samples": {"num_samples": -3}}))
    (root / "nan.yaml").write_text(yaml.safe_dump({"output": str(root / "o"), "sampling": {"guidance": {"scale": "nan"}}}))
    (root / "nockpt.yaml").write_text(yaml.safe_dump({"output": str(root / "o"),
                                                      "model": {"checkpoint": str(root / "none.pth")}}))
    (root / "nightly.yaml").write_text(yaml.safe_dump({"history": "h", "output": "o", "models": []}))
    run = {"output": str(root / "never"), "model": {"checkpoint": str(ckpt)}, "plan": {"path": str(plan)},
           "fid": {"reference": "mnist5k"}}
    for name, patch in {"labels99": {"sampling": {"labels": [3, 99]}},
                        "noref": {"fid": {"reference": str(root / "no-such-reference")}},
                        "noweights": {"fid": {"extractor": "inception-v3-compat", "weights": str(root / "no.pth")}},
                        "badckpt": {"model": {"checkpoint": str(root / "junk.safetensors")}},
                        "otherplan": {"plan": {"path": str(other_plan)}}}.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump({**run, **patch}))
    (root / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken header")
    overflow = save_checkpoint(make_tiny_model(out_std=0.5), root / "overflow.safetensors")
    (root / "a_file").write_text("not a directory")
    shards = root / "shards"
    shards.mkdir()
    (shards / "_manifest.json").write_bytes(b"\xff\xfe garbage")
    (root / "bad.npz").write_bytes(b"PK\x03\x04 not a zip")
    # statistics files a reader could take for real: sigma of another shape than mu, NaN in mu
    meta = {"n": 300, "extractor": "mnist5k-classifier", "image_size": [28, 28], "dataset": "x"}
    np.savez(root / "badsigma.npz", mu=np.zeros(64), sigma=np.eye(63), **meta)
    np.savez(root / "nan.npz", mu=np.full(64, np.nan), sigma=np.eye(64), **meta)
    # a key given twice (YAML keeps the last one silently), and a checkpoint path that is a directory
    (root / "dup.yaml").write_text(f"output: {root / 'o'}\nsamples: {{num_samples: 8}}\nsamples: {{num_samples: 9}}\n")
    (root / "nightly-dup.yaml").write_text("history: h\noutput: o\nhistory: h2\nmodels: [{config: c.yaml}]\n")
    (root / "ckpt-dir").mkdir()
    (root / "dirckpt.yaml").write_text(yaml.safe_dump({**run, "model": {"checkpoint": str(root / "ckpt-dir")}}))
    return {k: str(v) for k, v in {"root": root, "ckpt": ckpt, "raw": raw, "plan": plan, "other_plan": other_plan,
                                    "profile": profile, "shards": shards, "overflow": overflow}.items()}


def _cases(f):
    r = f["root"]
    missing = f"{r}/missing.safetensors"
    return [
        # profile
        (["profile", "--checkpoint", missing, "--out", f"{r}/p.json"], "checkpoint not found"),
        (["profile", "--checkpoint", f["raw"], "--in-channels", "3", "--out", f"{r}/p.json"],
         "in_channels=3: give the image channels of this raw checkpoint (--in-channels"),
        (["profile", "--checkpoint", f["ckpt"], "--num-images", "0", "--out", f"{r}/p.json"],
         "Invalid value for '--num-images'"),
        (["profile", "--checkpoint", f["ckpt"], "--guidance", "nan", "--out", f"{r}/p.json"],
         "Invalid value for '--guidance': Input should be a finite number"),
        (["profile", "--checkpoint", f["ckpt"], "--labels", "3,x", "--out", f"{r}/p.json"],
         "Invalid value for '--labels'"),
        # plan
        (["plan", "--profile", f"{r}/corrupt.json", "--out", f"{r}/x.json"], "profile is not valid JSON"),
        (["plan", "--profile", f"{r}/binary.json", "--out", f"{r}/x.json"], "cannot read the profile"),
        (["plan", "--profile", f"{r}/unknown.json", "--out", f"{r}/x.json"], "profile.colour: unknown field"),
        (["plan", "--profile", f"{r}/none.json", "--out", f"{r}/x.json"], "profile not found"),
        (["plan", "--profile", f["profile"], "--tol", "-1", "--out", f"{r}/x.json"], "Invalid value for '--tol'"),
        (["plan", "--hand", "9-2-8-4", "--checkpoint", f["ckpt"], "--out", f"{r}/x.json"], "Stack names blocks [9]"),
        (["plan", "--hand", "1-2-8-4", "--checkpoint", missing, "--out", f"{r}/x.json"], "checkpoint not found"),
        # generate
        (["generate", "--checkpoint", missing, "--num-samples", "4", "--batch-size", "2", "--out", f"{r}/g"],
         "checkpoint not found"),
        (["generate", "--checkpoint", f["ckpt"], "--plan", f"{r}/corrupt.json", "--num-samples", "4",
          "--batch-size", "2", "--out", f"{r}/g"], "plan is not valid JSON"),
        (["generate", "--checkpoint", f["ckpt"], "--plan", f["other_plan"], "--num-samples", "4", "--batch-size", "2",
          "--out", f"{r}/g"], "plan is for 2 blocks x 16 tokens"),
        (["generate", "--checkpoint", f["ckpt"], "--num-samples", "0", "--batch-size", "2", "--out", f"{r}/g"],
         "Invalid value for '--num-samples'"),
        (["generate", "--checkpoint", f["ckpt"], "--labels", "3,99", "--num-samples", "4", "--batch-size", "2",
          "--out", f"{r}/g"], "class 99 out of range"),
        (["generate", "--checkpoint", f["ckpt"], "--num-samples", "4", "--batch-size", "2", "--out",
          f"{r}/a_file"], "is a file"),
        (["generate", "--checkpoint", f["ckpt"], "--denoise", "inf", "--num-samples", "4", "--batch-size", "2",
          "--out", f"{r}/g"], "Invalid value for '--denoise': Input should be a finite number"),
        # sample
        (["sample", "--checkpoint", f["ckpt"], "--plan", f["other_plan"], "--out", f"{r}/s.png"],
         "plan is for 2 blocks"),
        (["sample", "--checkpoint", f["raw"], "--in-channels", "1", "--denoise", "1", "--out", f"{r}/s.png"],
         "does not record the training noise_std"),
        (["sample", "--checkpoint", f"{r}/ckpt-dir", "--out", f"{r}/s.png"], "ckpt-dir is a directory"),
        (["sample", "--checkpoint", f["ckpt"], "--batch-size", "0", "--out", f"{r}/s.png"],
         "Invalid value for '--batch-size'"),
        (["sample", "--checkpoint", f["ckpt"], "--autocast", "fp8", "--out", f"{r}/s.png"],
         "Invalid value for '--autocast'"),
        (["sample", "--checkpoint", f["overflow"], "--num-samples", "2", "--out", f"{r}/s.png"],
         "produced NaN/inf for batch rows"),
        (["generate", "--checkpoint", f["ckpt"], "--guidance", "nan", "--num-samples", "4", "--batch-size", "2",
          "--out", f"{r}/g"], "Invalid value for '--guidance'"),
        # fid
        (["fid", "--samples", f"{r}/nothing", "--reference", "mnist5k"], "neither a shard set"),
        (["fid", "--samples", f["shards"], "--reference", "mnist5k"], "_manifest.json is corrupt"),
        (["fid", "--samples", f["root"], "--reference", f"{r}/bad.npz"], "bad.npz is not a readable statistics"),
        (["fid", "--samples", f["root"], "--reference", "mnist5k", "--extractor", "inception"],
         "Invalid value for '--extractor'"),
        (["fid-export-inception", f["root"]], "Invalid value for 'OUT'"),
        (["fid", "--samples", "mnist5k", "--reference", f"{r}/badsigma.npz"],
         "sigma has shape (63, 63), mu has 64 features"),
        (["fid", "--samples", "mnist5k", "--reference", f"{r}/nan.npz"], "mu holds NaN or inf"),
        # run
        (["run", f"{r}/none.yaml"], "run config not found"),
        (["run", f"{r}/corrupt.yaml"], "run config is not valid YAML"),
        (["run", f"{r}/unknown.yaml"], "samplng: unknown field; allowed here: output, name"),
        (["run", f"{r}/range.yaml"], "samples.num_samples: Input should be greater than or equal to 1"),
        (["run", f"{r}/nan.yaml"], "sampling.guidance.scale: Input should be a finite number"),
        (["run", f"{r}/nockpt.yaml"], "checkpoint not found"),
        (["run", f"{r}/labels99.yaml"], "class 99 out of range, the model has 10 classes"),
        (["run", f"{r}/noref.yaml"], "no-such-reference' is neither a shard set"),
        (["run", f"{r}/noweights.yaml"], "extractor weights"),
        (["run", f"{r}/badckpt.yaml"], "junk.safetensors: corrupt safetensors file"),
        (["run", f"{r}/otherplan.yaml"], "plan is for 2 blocks x 16 tokens"),
        (["run", f"{r}/dup.yaml"], "duplicate key 'samples' (first at line 2)"),
        (["run", f"{r}/dirckpt.yaml"], "ckpt-dir is a directory"),
        # report, nightly
        (["report", "--data", f"{r}/corrupt.json", "--out", f"{r}/rep"], "report data is not valid JSON"),
        (["report", "--history", f["plan"], "--out", f"{r}/rep"], "is a file: a history is a folder"),
        (["report", "--out", f"{r}/rep"], "give at least one --data file or a --history table"),
        (["nightly", f"{r}/nightly.yaml"], "models: List should have at least 1 item"),
        (["nightly", f"{r}/none.yaml"], "nightly config not found"),
        (["nightly", f"{r}/nightly-dup.yaml"], "duplicate key 'history' (first at line 1)"),
        (["report", "--data", f"{r}/binary.json", "--out", f"{r}/rep"], "cannot read the report data"),
        # train
        (["train", "--dataset", f"{r}/no-such-folder", "--out", f"{r}/t.safetensors"], "no-such-folder"),
        (["train", "--lr", "0", "--out", f"{r}/t.safetensors"], "Invalid value for '--lr'"),
        (["train", "--width", "100", "--head-dim", "64", "--epochs", "1", "--out", f"{r}/t.safetensors"],
         "Invalid value for '--width': 100: must be a multiple of head_dim=64"),
        (["train", "--dataset", "digits", "--patch-size", "3", "--epochs", "1", "--out", f"{r}/t.safetensors"],
         "cannot train this model: ModelConfig.img_size=8 is not a multiple of patch_size=3"),
        (["train", "--resume", f"{r}/none.safetensors"], "resume state not found"),
    ]


def test_every_command_reports_bad_input_as_a_message(files):
    runner = CliRunner()
    commands = set()
    for args, message in _cases(files):
        result = runner.invoke(main, args)
        commands.add(args[0])
        where = f"{' '.join(args)}\n{result.output}"
        assert result.exit_code != 0, where
        # a handled error leaves through SystemExit; anything else is a traceback waiting to happen
        assert isinstance(result.exception, SystemExit), f"{where}\n{result.exception!r}"
        assert "Traceback" not in result.output, where
        assert message in " ".join(result.output.split()), where
    assert commands == set(main.commands), f"commands without a bad-input case: {set(main.commands) - commands}"
    # the run's inputs were refused before any stage: nothing was written where it would have gone
    assert not (Path(files["root"]) / "never").exists()
    assert not (Path(files["root"]) / "g").exists() and not (Path(files["root"]) / "s.png").exists()


def test_installed_command_prints_one_paragraph_and_no_traceback(files, tmp_path):
    """The real entry point: the message on stderr, exit status 1, and a dashboard RAY_ADDRESS refused."""
    env = {**os.environ, "RAY_ADDRESS": "http://127.0.0.1:8265"}
    tarflow_gs = shutil.which("tarflow-gs")
    assert tarflow_gs, "the package's console script is installed (pip install -e .)"
    bad = subprocess.run([tarflow_gs, "generate", "--checkpoint", files["ckpt"],
                          "--plan", f"{files['root']}/corrupt.json", "--num-samples", "4", "--batch-size", "2",
                          "--out", str(tmp_path / "g")], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("Error: ") and bad.stderr.count("\n") == 1, bad.stderr
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"output": str(tmp_path / "out"), "model": {"checkpoint": files["ckpt"]},
                                      "plan": {"path": files["plan"]}, "fid": {"enabled": False}}))
    refused = subprocess.run([tarflow_gs, "run", str(config)], capture_output=True,
                             text=True, env=env, timeout=120)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "is a dashboard address" in refused.stderr and "ray job submit" in refused.stderr, refused.stderr


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and "version" in result.output


def _commands(group, path=()):
    import click

    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, path + (name,))
        else:
            yield " ".join(path + (name,)), command


def test_every_option_of_every_command_has_help():
    import click

    missing = [f"{name} {param.opts[0]}" for name, command in _commands(main) for param in command.params
               if isinstance(param, click.Option) and not (param.help or "").strip()]
    assert not missing
    assert len(list(_commands(main))) >= 10


@pytest.mark.parametrize("args, option", [
    (["train", "--device", "gpu"], "--device"),
    (["train", "--noise-std", "inf"], "--noise-std"),
    (["train", "--width", "100", "--head-dim", "64"], "--width"),
    (["fid", "--samples", "a", "--reference", "b", "--extractor", "inception"], "--extractor"),
    (["fid", "--samples", "a", "--reference", "b", "--kid-samples", "-1"], "--kid-samples"),
    (["fid", "--samples", "a", "--reference", "b", "--reference-image-size", "0"], "--reference-image-size"),
    (["generate", "--checkpoint", "demo", "--out", "x", "--autocast", "fp8"], "--autocast"),
    (["run", "c.yaml", "--stop-after", "never"], "--stop-after"),
    (["generate", "--checkpoint", "demo", "--num-samples", "4", "--batch-size", "2", "--out", ""], "--out"),
    (["generate", "--checkpoint", "demo", "--num-samples", "4", "--batch-size", "2", "--out", "x", "--labels", "99"],
     "--labels"),
    (["generate", "--checkpoint", "demo", "--num-samples", "4", "--batch-size", "2", "--out", "x", "--guidance",
      "nan"], "--guidance"),
    (["sample", "--checkpoint", "demo", "--out", "x.png", "--attn-temp", "0"], "--attn-temp"),
    (["sample", "--checkpoint", "demo", "--out", "x.png", "--noise-std", "-1"], "--noise-std"),
    (["sample", "--checkpoint", "", "--out", "x.png"], "--checkpoint"),
    (["profile", "--checkpoint", "demo", "--out", "p.json", "--seed", "-1"], "--seed"),
    (["plan", "--profile", "p.json", "--tol", "nan", "--out", "x.json"], "--tol"),
    (["plan", "--hand", "1-2-8-4", "--checkpoint", "demo", "--in-channels", "0", "--out", "x.json"], "--in-channels"),
    (["fid", "--samples", "a", "--reference", "b", "--extractor-weights", "w.pth"], "--extractor-weights"),
    (["fid", "--samples", "a", "--reference", "b", "--num-gpus", "-1"], "--num-gpus"),
])
def test_bad_option_values_exit_2_naming_the_option(args, option):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output, result.output


def test_an_error_names_the_option_by_its_location_not_its_text():
    """A check's error carries its field's path: a nested field names its own option, and a message that
    happens to begin like a field (`seed=3 ...`) is not taken for that field's."""
    import click

    from tarflow.spec import SpecError
    from workflows.cli.options import spec_options

    def raising(error):
        @click.command()
        @spec_options()
        def command(spec):
            raise error
        return command

    located = CliRunner().invoke(raising(SpecError("beyond the attention kernel's range", ("guidance", "attn_temp"),
                                                   9.0)), [])
    assert located.exit_code == 2, located.output
    assert "Invalid value for '--attn-temp': 9.0: beyond the attention kernel's range" in located.output
    unlocated = CliRunner().invoke(raising(SpecError("seed=3 of the plan's calibration is not the spec's")), [])
    assert unlocated.exit_code == 1 and isinstance(unlocated.exception, SpecError), unlocated.output


def test_a_nested_validation_names_each_field_by_its_whole_path():
    """A type validated inside another's validator (a run identity's sampling spec): pydantic's own errors and
    the inner type's checks alike are located under the field that holds it; the location survives pickling,
    as an error raised in a Ray task is."""
    import pickle
    from typing import Annotated

    from pydantic import AfterValidator, BaseModel

    from tarflow.schema import SchemaError, validate

    class Holder(BaseModel):
        spec: Annotated[dict, AfterValidator(lambda d: validate(SamplingSpec, d, "") and d)]

    for spec, loc, line in [({"guidance": {"scale": "inf"}}, ("spec", "guidance", "scale"),
                             "settings.spec.guidance.scale: Input should be a finite number (got 'inf')"),
                            ({"guidance": {"attn_temp": 0}}, ("spec", "guidance", "attn_temp"),
                             "settings.spec.guidance.attn_temp=0.0: must be a finite number > 0")]:
        with pytest.raises(SchemaError) as e:
            validate(Holder, {"spec": spec}, "settings")
        assert str(e.value) == line and e.value.loc == loc
        again = pickle.loads(pickle.dumps(e.value))
        assert str(again) == line and again.loc == loc


def test_every_number_rule_reads_the_same_in_every_type():
    """One helper per rule: a positive integer, an integer >= 0, a finite number > 0 say so in the same words
    wherever they are checked."""
    from tarflow.spec import Guidance
    from tarflow.train import TrainConfig

    for make, message in [(lambda: TrainConfig(epochs=0), "epochs=0: must be a positive integer"),
                          (lambda: ModelRef("demo", 0), "in_channels=0: must be a positive integer"),
                          (lambda: SamplingSpec(seed=-1), "seed=-1: must be an integer >= 0"),
                          (lambda: TrainConfig(warmup_steps=-1), "warmup_steps=-1: must be an integer >= 0"),
                          (lambda: TrainConfig(lr=0.0), "lr=0.0: must be a finite number > 0"),
                          (lambda: Guidance(attn_temp=0.0), "attn_temp=0.0: must be a finite number > 0")]:
        with pytest.raises(ValueError) as e:
            make()
        assert str(e.value) == message


def test_options_take_type_choices_and_default_from_the_field_they_fill():
    """The sampling spec's, a stage's resources', the model reference's and the FID settings' options are
    derived from those types: the same defaults and choices, nothing restated."""
    import typing

    from tarflow import SamplingSpec
    from tarflow.schema import field_spec
    from workflows.cli.options import SPEC_OPTIONS
    from workflows.config import FidSettings, Resources

    spec = {param.name: param for param in main.commands["sample"].params}
    for path, decl, _ in SPEC_OPTIONS:
        param = spec[f"spec__{'__'.join(path)}"]
        annotation, default = field_spec(SamplingSpec, path)
        assert param.opts[0] == decl.split("/")[0]
        if path != ("batch_size",):  # each command sets its own batch size
            assert param.default == default, decl
        if typing.get_origin(annotation) is typing.Literal:
            assert list(param.type.choices) == list(typing.get_args(annotation)), decl
    generate = {param.name: param for param in main.commands["generate"].params}
    for name in Resources.model_fields:
        assert generate[f"resources__{name}"].default == Resources.model_fields[name].default
    fid = {param.name: param for param in main.commands["fid"].params}
    for name, decl in (("batch_size", "batch_size"), ("kid_samples", "kid_samples"), ("extractor", "extractor")):
        assert fid[decl].default == FidSettings.model_fields[name].default
