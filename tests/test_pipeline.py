"""The pipeline: config errors and stage keys (no Ray); on a real local Ray with a tiny model, stage skipping, resume
after a crash, a retried report stage, one kind of thing per output."""
import json
from pathlib import Path

import pytest
from conftest import make_tiny_model

from tarflow import GSJacobi, Jacobi, Plan, load_checkpoint, model_hash
from workflows import pipeline
from workflows.config import ConfigError, RunConfig
from workflows.pipeline import keys
from workflows.stages.generate import RunIdentity
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


# ---- stage keys: pure functions of a stage's inputs, no Ray ----------------------------------------------------

MODEL_HASH = "0123456789abcdef"
AUTO_PLAN = Plan.uniform(4, 16, GSJacobi(segment_len=5, tol=1e-4))  # what the plan stage made, for the later keys
KEY_CONFIGS = {  # a given plan without FID; the auto plan with FID and a scaling section; a hand plan
    "path": {"name": "keys", "output": "runs/keys", "plan": {"path": "/data/plan.json"},
             "sampling": {"batch_size": 8, "seed": 3}, "samples": {"num_samples": 24, "shard_size": 8},
             "fid": {"enabled": False}, "resources": {"generate": {"actors": 1, "num_cpus": 0.5}}},
    "auto": {"name": "keys-auto", "output": "runs/keys-auto", "plan": {"tol": 0.001},
             "calibration": {"num_images": 2, "data": "mnist5k"},
             "sampling": {"batch_size": 4, "seed": 1, "guidance": {"scale": 2.0, "annealed": True}},
             "samples": {"num_samples": 24, "shard_size": 8},
             "fid": {"enabled": True, "reference": "mnist5k", "kid_samples": 100},
             "report": {"scaling_batch_sizes": [1, 4]},
             "resources": {"generate": {"actors": 2, "num_cpus": 2}, "fid": {"actors": 1}}},
    "hand": {"name": "keys-hand", "output": "runs/keys-hand", "plan": {"hand": "3-2-4-3"},
             "sampling": {"batch_size": 2, "seed": 0}, "samples": {"num_samples": 4, "shard_size": 2},
             "fid": {"enabled": False}},
}
# Computed once by the code before the stage functions (main at b14172f): its `run` on these configs (with a tiny
# model's checkpoint), the model hash fixed, the plan file read as `_given_plan` says, the stages' work stubbed,
# each key read from its log line. A run made before must be skipped, not recomputed: these values never change.
EARLIER_KEYS = {
    "path": {"plan": "6e68ba372b31", "generate": "231bf16a007c", "report": "09f165fe56ea"},
    "auto": {"profile": "9c39a38cf4c8", "plan": "52c0f8d4533c", "generate": "326329136a30", "fid": "b27294b0a343",
             "report": "7aebb071465f"},
    "hand": {"plan": "9a5cab251b8f", "generate": "4e91027b6a44", "report": "d4476155c9ef"},
}


def _given_plan(cfg: RunConfig, model_hash: str = MODEL_HASH) -> Plan | None:
    """The plan the run's config gives, as `RunContext.open` reads it (the 4-block, 16-token tiny model's)."""
    if cfg.plan.source == "path":
        return Plan.uniform(4, 16, Jacobi(tol=1e-5))
    if cfg.plan.source == "hand":
        return Plan.from_paper_notation(cfg.plan.hand, 4, 16).bound_to(model_hash)
    return None


def stage_keys(cfg: RunConfig, model_hash: str = MODEL_HASH, given: Plan | None = None,
               made: Plan = AUTO_PLAN) -> dict[str, str]:
    """Every stage's key as a run chains them: the profile's only for the auto plan, the FID's only with FID on;
    the samples keyed by their identity, under the plan the plan stage made (`given`, else `made`)."""
    spec = cfg.sampling.for_model(10)
    out = {"profile": keys.profile(cfg, spec, model_hash)} if cfg.plan.source == "auto" else {}
    out["plan"] = keys.plan(cfg, spec, model_hash, out.get("profile"), given)
    identity = RunIdentity.of(make_tiny_model(), model_hash, given or made, spec, cfg.samples, cfg.resources.generate)
    out["generate"] = keys.generate(cfg, identity)
    fid_key = keys.fid(cfg, out["generate"])
    if fid_key is not None:
        out["fid"] = fid_key
    out["report"] = keys.report(cfg, out["generate"], fid_key)
    return out


@pytest.mark.parametrize("name", sorted(KEY_CONFIGS))
def test_stage_keys_are_those_of_earlier_versions(name):
    cfg = _from_dict(KEY_CONFIGS[name])
    assert stage_keys(cfg, given=_given_plan(cfg)) == EARLIER_KEYS[name]


def _patched(d: dict, path: str, value) -> dict:
    d = json.loads(json.dumps(d))
    *parents, last = path.split(".")
    node = d
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return d


ALL = {"profile", "plan", "generate", "fid", "report"}


@pytest.mark.parametrize("path, value, changed", [
    ("calibration.num_images", 3, {"profile", "plan"}),  # the same plan made: the samples stay
    ("calibration.data", None, {"profile", "plan"}),
    ("sampling.guidance.annealed", False, ALL),  # the whole spec keys every stage that samples
    ("sampling.guidance.attn_temp", 0.5, ALL),
    ("sampling.guidance.scale", 1.5, ALL),
    ("sampling.seed", 2, ALL),
    ("sampling.batch_size", 8, ALL),
    ("resources.profile.num_cpus", 2, {"profile", "plan"}),
    ("resources.generate.actors", 1, {"plan"}),  # the plan is raced on a generate worker; images do not change
    ("resources.generate.num_cpus", 1, {"plan", "generate", "fid", "report"}),  # torch threads decide pixels
    ("resources.generate.num_gpus", 1, {"plan", "generate", "fid", "report"}),
    ("resources.fid.actors", 2, set()),
    ("plan.tol", 1e-4, {"plan"}),
    ("samples.num_samples", 32, {"generate", "fid", "report"}),
    ("samples.shard_size", 4, {"generate", "fid", "report"}),
    ("fid.kid_samples", 50, {"fid", "report"}),
    ("fid.metrics", ["fid", "prc"], {"fid", "report"}),  # a setting added later keys the stage once it is set
    ("fid.reference", "digits", {"fid", "report"}),
    ("name", "other", {"report"}),
    ("report.scaling_batch_sizes", [2], {"report"}),
    ("report.fid_sequential", True, {"report"}),  # a setting added later keys the stage once it is set
])
def test_which_inputs_change_which_keys(path, value, changed):
    base = KEY_CONFIGS["auto"]
    before, after = stage_keys(_from_dict(base)), stage_keys(_from_dict(_patched(base, path, value)))
    assert {k for k in before if before[k] != after[k]} == changed


def test_the_model_the_plan_made_and_fid_off_change_their_keys():
    cfg = _from_dict(KEY_CONFIGS["auto"])
    base = stage_keys(cfg)
    assert all(a != b for a, b in zip(base.values(), stage_keys(cfg, model_hash="f" * 16).values()))
    other = stage_keys(cfg, made=Plan.uniform(4, 16, GSJacobi(segment_len=3, tol=1e-4)))
    assert {k for k in base if base[k] != other[k]} == {"generate", "fid", "report"}
    off = stage_keys(_from_dict(_patched(KEY_CONFIGS["auto"], "fid.enabled", False)))
    assert "fid" not in off and off["report"] != base["report"]
    assert {k: off[k] for k in ("profile", "plan", "generate")} == {k: base[k] for k in ("profile", "plan", "generate")}


# ---- stages on a real local Ray ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny8x8_run(tmp_path_factory, tiny8x8_checkpoint_path):
    """The tiny8x8 checkpoint and a run config (given plan, no FID) writing under a fresh directory."""
    root = tmp_path_factory.mktemp("pipeline")
    Plan.uniform(4, 16, Jacobi(tol=1e-5)).save(root / "plan.json")
    return root, {"name": "tiny", "output": str(root / "out"), "model": {"checkpoint": str(tiny8x8_checkpoint_path)},
                  "plan": {"path": str(root / "plan.json")},
                  "sampling": {"batch_size": 8, "seed": 3}, "samples": {"num_samples": 24, "shard_size": 8},
                  "fid": {"enabled": False},
                  "resources": {"generate": {"actors": 1, "num_cpus": 0.5}}}


def _config(d, **samples) -> RunConfig:
    d = json.loads(json.dumps(d))
    d["samples"].update(samples)
    return _from_dict(d)


def test_stages_skip_when_outputs_exist_and_resume_after_a_crash(tiny8x8_run, ray_local, monkeypatch):
    import tarflow.checkpoint as checkpoint

    root, d = tiny8x8_run
    cfg = _config(d)
    reads, real = [], checkpoint.load_checkpoint
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda ref, *a, **k: reads.append(ref) or real(ref, *a, **k))
    first = pipeline.run(cfg, stop_after="generate")
    assert reads == [cfg.model.checkpoint], "the driver reads the checkpoint once; the workers load their own"
    monkeypatch.undo()
    assert [(s.name, s.skipped) for s in first.stages] == [("plan", False), ("generate", False)]
    assert read_manifest(first.samples).rows == 24
    given = Plan.load(cfg.plan.path)
    expected = stage_keys(cfg, model_hash(load_checkpoint(cfg.model.checkpoint)), given)
    assert [s.key for s in first.stages] == [expected["plan"], expected["generate"]], "the run chains the key functions"

    # the report stage crashes after its history row, before report.html: a file where its folder goes
    history = str(root / "out" / "history.parquet")
    (root / "out" / "reports").write_text("in the way")
    with pytest.raises(pipeline.PipelineError, match="stage 'report' failed: NotADirectoryError.*re-run the same"):
        pipeline.run(_config(d))
    index = json.loads((root / "out" / "run.json").read_text())
    assert [s["name"] for s in index["stages"]] == ["plan", "generate"]
    assert [r.run_id for r in read_history(history)] == [expected["report"]]
    (root / "out" / "reports").unlink()

    resumed = pipeline.run(_config(d))
    assert [(s.name, s.skipped) for s in resumed.stages] == [("plan", True), ("generate", True), ("report", False)]
    assert resumed.stages[-1].key == expected["report"]
    assert resumed.samples == first.samples
    page = (root / "out" / "report.html").read_text()
    assert 'id="summary-table"' in page and "given plan" not in page and "path plan" in page
    assert resumed.model_result.runs[1].max_abs_error < 1e-4
    assert len(read_history(history)) == 1, "the retried report stage found its row and appended none"

    again = pipeline.run(_config(d))
    assert all(s.skipped for s in again.stages)
    assert len(read_history(history)) == 1, "a skipped report adds no history row"

    # a changed sampling input re-runs generate (into its own folder) and what follows, not the plan
    more = pipeline.run(_config(d, num_samples=32))
    assert [(s.name, s.skipped) for s in more.stages] == [("plan", True), ("generate", False), ("report", False)]
    assert more.samples != first.samples and read_manifest(more.samples).rows == 32
    assert read_manifest(first.samples).rows == 24, "the earlier run's shards are untouched"
    assert len(read_history(history)) == 2, "another report, another row"


def test_missing_checkpoint_fails_before_any_stage(tiny8x8_run, tmp_path):
    _, d = tiny8x8_run
    d = {**d, "model": {"checkpoint": str(tmp_path / "nope.safetensors")}, "output": str(tmp_path / "out")}
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        pipeline.run(_from_dict(d))
    assert not (tmp_path / "out" / "run.json").exists()


def test_a_damaged_stage_output_is_named_with_what_to_do(tiny8x8_run, tmp_path):
    """A given plan's stage needs no Ray; its output, edited to hold an invalid plan, is named when read back."""
    _, d = tiny8x8_run
    cfg = _config({**d, "output": str(tmp_path / "out")})
    (record,) = pipeline.run(cfg, stop_after="plan").stages
    written = json.loads(Path(record.output).read_text())
    Path(record.output).write_text(json.dumps({**written, "num_blocks": 0}))
    with pytest.raises(pipeline.PipelineError, match=rf"{record.output} is damaged \(plan.num_blocks=0: must be a "
                                                     r"positive integer\): delete it and re-run the same command"):
        pipeline.run(cfg)  # read before the generate stage: no Ray started


def test_an_output_holds_one_kind_of_thing(tiny8x8_run, ray_local, tmp_path):
    """A run refuses a shard set as its output, and generate a run's folder, naming what is there; neither
    writes anything into the other."""
    from workflows.config import GenerateConfig
    from workflows.stages.generate import GenerateError, generate

    _, d = tiny8x8_run
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


@pytest.mark.slow
def test_the_report_pairs_the_plans_fid_with_sequentials_on_the_same_ids(tiny8x8_run, ray_local, tmp_path):
    """`report.fid_sequential`: the run's ids drawn sequentially into a set of their own; both FIDs, side by side
    in the report and the history, are those of the two sets over the same ids (each recomputed here on its own),
    and sets of other noise are refused."""
    import shutil

    from workflows.stages.features import EvaluateError
    from workflows.stages.fid import check_same_ids, evaluate_fid

    _, d = tiny8x8_run
    cfg = _config({**d, "output": str(tmp_path / "out"), "fid": {"reference": "digits"},
                   "report": {"fid_sequential": True}})
    result = pipeline.run(cfg)
    names = [s.name for s in result.stages]
    assert names == ["plan", "generate", "fid", "sequential", "fid-paired", "report"]
    sequential = result.stages[names.index("sequential")].output
    assert sequential != result.samples, "a Jacobi plan's samples and sequential's are two sets"
    plan_m, seq_m = read_manifest(result.samples), read_manifest(sequential)
    assert [seq_m.shard_ids(i) for i in range(seq_m.num_shards)] == [plan_m.shard_ids(i) for i in range(plan_m.num_shards)]
    assert {k: v for k, v in seq_m.settings.items() if k != "plan_hash"} == \
        {k: v for k, v in plan_m.settings.items() if k != "plan_hash"}
    assert seq_m.settings["plan_hash"] == Plan.sequential(4, 16).bound_to(
        model_hash(load_checkpoint(cfg.model.checkpoint))).fingerprint()

    paired = result.fid_difference
    alone = evaluate_fid(sequential, "digits", cfg.fid, write_result=False)
    assert paired.fid_sequential == pytest.approx(alone.fid, rel=1e-6)
    assert paired.fid_plan == pytest.approx(result.fid.fid, rel=1e-6)
    assert paired.sample_count == 24 and paired.groups == 10
    assert paired.difference == paired.fid_plan - paired.fid_sequential and paired.sequential_se > 0

    data = json.loads(next(Path(cfg.output, "reports").glob("*/report-data.json")).read_text())
    seq_run, plan_run = data["models"][0]["runs"][:2]
    assert (seq_run["fid"], plan_run["fid"]) == (paired.fid_sequential, result.fid.fid)
    page = Path(result.report).read_text()
    assert 'class="quality-table"' in page and f"{paired.difference:+.4f} +- {paired.difference_se:.4f}" in page
    [row] = read_history(str(tmp_path / "out" / "history.parquet"))
    assert (row.fid_sequential, row.fid_sequential_se, row.fid_difference_se) == (
        paired.fid_sequential, paired.sequential_se, paired.difference_se)

    # the same ids under other noise (another seed) are not a pair
    other = tmp_path / "other-seed"
    shutil.copytree(sequential, other)
    manifest = json.loads((other / "_manifest.json").read_text())
    manifest["settings"]["spec"]["seed"] += 1
    (other / "_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EvaluateError, match=r"not the same sample ids drawn two ways: spec.seed=3 there vs 4 now;"):
        check_same_ids(result.samples, str(other))

    again = pipeline.run(cfg)
    assert all(s.skipped for s in again.stages) and again.fid_difference == paired
