"""The pipeline on a real local Ray with a tiny model: config errors, stage skipping, resume after a crash."""
import json
from pathlib import Path

import pytest
from conftest import make_tiny_model

from tarflow import Jacobi, Plan, save_checkpoint
from workflows import pipeline
from workflows.config import ConfigError, RunConfig
from workflows.pipeline import runner as pipeline_run
from workflows.storage.history import read_history
from workflows.storage.shards import read_manifest

REPO = Path(__file__).resolve().parents[1]


# ---- config validation -----------------------------------------------------------------------------------------

def _from_dict(d) -> RunConfig:
    from tarflow.schema import validate

    return validate(RunConfig, d, "", ConfigError)


@pytest.mark.parametrize("patch, message", [
    ({"samples": {"num_samples": 0}}, "samples.num_samples: Input should be greater than or equal to 1 (got 0)"),
    ({"sampling": {"labels": "all"}}, "sampling.labels"),
    ({"sampling": {"labels": [1, -2]}}, "sampling.labels=[1, -2]: class ids are integers >= 0 (-1: unconditional)"),
    ({"sampling": {"guidance": {"what": "c"}}}, "sampling.guidance.what: Input should be 'a', 'b' or 'ab' (got 'c')"),
    ({"sampling": {"guidance": {"scale": "nan"}}}, "sampling.guidance.scale: Input should be a finite number"),
    ({"device": "cuda"}, "device: unknown field; allowed here: output, name, model"),
    ({"plan": {"tol": 0}}, "plan.tol: Input should be greater than 0 (got 0)"),
    ({"plan": {"path": "p.json", "hand": "7-8-32-10"}}, "plan.path and plan.hand are both set"),
    ({"resources": {"generate": {"num_gpus": -1}}}, "resources.generate.num_gpus: Input should be greater than or equal to 0"),
    ({"resources": {"fid": {"actors": 0}}}, "resources.fid.actors: Input should be greater than or equal to 1"),
    ({"resources": {"fid": {"gpus": 1}}}, "resources.fid.gpus: unknown field; allowed here: actors, num_cpus, num_gpus"),
    ({"samples": {"num_sample": 5}}, "samples.num_sample: unknown field; allowed here: num_samples, shard_size"),
    ({"samplng": {}}, "samplng: unknown field; allowed here: output, name, model, calibration"),
    ({"model": "demo"}, "model: Input should be a dictionary"),
    ({"fid": {"extractor": "inception"}}, "fid.extractor: Input should be 'mnist5k-classifier', 'inception-v3-torchscript'"),
])
def test_config_errors_name_field_and_allowed_values(patch, message):
    with pytest.raises(ConfigError) as e:
        _from_dict({"output": "runs/x", **patch})
    assert message in str(e.value)


def test_numbers_written_as_yaml_strings_are_numbers(tmp_path):
    """PyYAML reads `1e-3` (no dot) as a string; the config takes it as the number it means."""
    f = tmp_path / "c.yaml"
    f.write_text("output: out\nplan: {tol: 1e-3}\nsampling: {guidance: {scale: 2e0}}\n")
    cfg = RunConfig.load(f)
    assert cfg.plan.tol == 1e-3 and cfg.sampling.guidance.scale == 2.0


def test_config_requires_output_and_valid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="output: Field required"):
        _from_dict({"model": {"checkpoint": "demo"}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("output: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: run config is not valid YAML"):
        RunConfig.load(bad)


@pytest.mark.parametrize("name", ["demo", "afhq256", "imagenet64-uncond", "imagenet64", "imagenet128"])
def test_shipped_job_configs_validate(name):
    cfg = RunConfig.load(REPO / "jobs" / "configs" / f"{name}.yaml")
    assert cfg.name == name and cfg.plan.source == "auto"
    assert cfg == _from_dict(cfg.model_dump(mode="json"))


# ---- stages ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny checkpoint and a run config (given plan, no FID) writing under a fresh directory."""
    root = tmp_path_factory.mktemp("pipeline")
    model = make_tiny_model()
    ckpt = save_checkpoint(model, root / "tiny.safetensors")
    plan = Plan.uniform(4, model.num_tokens, Jacobi(tol=1e-5))
    plan.save(root / "plan.json")
    return root, {"name": "tiny", "output": str(root / "out"), "model": {"checkpoint": str(ckpt)},
                  "plan": {"path": str(root / "plan.json")},
                  "sampling": {"batch_size": 8, "seed": 3}, "samples": {"num_samples": 24, "shard_size": 8},
                  "fid": {"enabled": False},
                  "resources": {"generate": {"actors": 1, "num_cpus": 0.5}}}


def _config(d, **samples) -> RunConfig:
    d = json.loads(json.dumps(d))
    d["samples"].update(samples)
    return _from_dict(d)


def test_stages_skip_when_outputs_exist_and_resume_after_a_crash(tiny, ray_local, monkeypatch):
    root, d = tiny
    cfg = _config(d)
    first = pipeline.run(cfg, stop_after="generate")
    assert [(s.name, s.skipped) for s in first.stages] == [("plan", False), ("generate", False)]
    assert read_manifest(first.samples).rows == 24

    # a crash in the report stage keeps everything before it
    def crash(*args, **kwargs):
        raise MemoryError("simulated crash")

    monkeypatch.setattr(pipeline_run, "_report", crash)
    with pytest.raises(pipeline.PipelineError, match="stage 'report' failed: MemoryError.*re-run the same command"):
        pipeline.run(_config(d))
    index = json.loads((root / "out" / "run.json").read_text())
    assert [s["name"] for s in index["stages"]] == ["plan", "generate"]
    monkeypatch.undo()

    resumed = pipeline.run(_config(d))
    assert [(s.name, s.skipped) for s in resumed.stages] == [("plan", True), ("generate", True), ("report", False)]
    assert resumed.samples == first.samples
    page = (root / "out" / "report.html").read_text()
    assert 'id="summary-table"' in page and "given plan" not in page and "path plan" in page
    assert resumed.model_result.runs[1].max_abs_error < 1e-4
    assert len(read_history(str(root / "out" / "history.parquet"))) == 1

    again = pipeline.run(_config(d))
    assert all(s.skipped for s in again.stages)
    assert len(read_history(str(root / "out" / "history.parquet"))) == 1, "a skipped report adds no history row"

    # a changed sampling input re-runs generate (into its own folder) and what follows, not the plan
    more = pipeline.run(_config(d, num_samples=32))
    assert [(s.name, s.skipped) for s in more.stages] == [("plan", True), ("generate", False), ("report", False)]
    assert more.samples != first.samples and read_manifest(more.samples).rows == 32
    assert read_manifest(first.samples).rows == 24, "the earlier run's shards are untouched"


def test_missing_checkpoint_fails_before_any_stage(tiny, tmp_path):
    _, d = tiny
    d = {**d, "model": {"checkpoint": str(tmp_path / "nope.safetensors")}, "output": str(tmp_path / "out")}
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        pipeline.run(_from_dict(d))
    assert not (tmp_path / "out" / "run.json").exists()


def test_every_guidance_setting_keys_the_profile(tiny, ray_local, tmp_path):
    """The profile's key hashes the whole sampling spec: annealing or attn_temp alone make a new profile,
    and the profile records the spec it measured."""
    from tarflow.profile import Profile

    _, d = tiny
    base = {**d, "output": str(tmp_path / "out"), "plan": {"tol": 1e-3}, "calibration": {"num_images": 1},
            "sampling": {"batch_size": 1, "seed": 3, "guidance": {"scale": 1.0}}}
    keys = []
    for guidance in ({"scale": 1.0}, {"scale": 1.0, "annealed": True}, {"scale": 1.0, "attn_temp": 0.5}):
        cfg = _from_dict({**base, "sampling": {**base["sampling"], "guidance": guidance}})
        result = pipeline.run(cfg, stop_after="profile")
        (stage,) = result.stages
        assert not stage.skipped and stage.workers
        keys.append(stage.key)
        assert Profile.from_json(Path(stage.output).read_text()).spec.guidance == cfg.sampling.guidance
    assert len(set(keys)) == 3


def test_an_output_holds_one_kind_of_thing(tiny, ray_local, tmp_path):
    """A run refuses a shard set as its output, and generate a run's folder, naming what is there; neither
    writes anything into the other."""
    from workflows.config import GenerateConfig
    from workflows.stages.generate import GenerateError, generate

    _, d = tiny
    runs = _config({**d, "output": str(tmp_path / "run")})
    pipeline.run(runs, stop_after="generate")
    samples = next((tmp_path / "run").glob("samples-*"))
    before = sorted(p.name for p in samples.iterdir())
    with pytest.raises(pipeline.PipelineError, match=r"is a shard set \(it holds _manifest.json, data\)"):
        pipeline.run(_config({**d, "output": str(samples)}), stop_after="plan")
    assert sorted(p.name for p in samples.iterdir()) == before

    cfg = GenerateConfig(model=runs.model, out=str(tmp_path / "run"), samples=runs.samples, spec=runs.sampling,
                         resources=runs.resources.generate)
    with pytest.raises(GenerateError, match=r"is the folder of a `tarflow-gs run` \(it holds run.json\)"):
        generate(cfg)
    assert not list((tmp_path / "run").glob("_*")) and not (tmp_path / "run" / "data").exists()
