"""The report's speedup-vs-batch-size section: an auto plan profiled and scheduled per batch size, timed
against sequential and the one-pass bound on the same noise; the run's own batch size from its comparison."""
import base64
import json
import re
from pathlib import Path

import pytest
from conftest import make_tiny_model

from tarflow import SamplingSpec
from tarflow.schema import validate
from workflows import pipeline
from workflows.config import ConfigError, RunConfig
from workflows.pipeline import RunResult, summary_text
from workflows.report import ModelResult, ReportData, SamplerResult, ScalingPoint, render_html, where_plans_pay, \
    write_report
from workflows.stages.compare import batch_scaling

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-3


def _check_points(points, batch_sizes, num_blocks=4):
    assert [p.batch_size for p in points] == batch_sizes
    for p in points:
        assert p.sequential_seconds > 0 and p.plan_seconds > 0
        assert p.speedup == pytest.approx(p.sequential_seconds / p.plan_seconds)
        assert p.bound_speedup >= 1, "one parallel pass per block costs less than T-1 sequential steps"
        assert p.max_abs_error <= TOL, "the scheduler's plan stays within its tolerance on the comparison noise"
        assert len(p.plan.split(", ")) == num_blocks
        if p.fallback is not None:
            assert all(b.endswith("sequential") for b in p.plan.split(", ")), "a fallback plan is sequential"


@pytest.fixture(scope="module")
def points():
    model = make_tiny_model()
    return batch_scaling(model, SamplingSpec(batch_size=2).for_model(10), [1, 4], None, TOL)


def test_batch_scaling_profiles_plans_and_times_each_batch_size(points):
    _check_points(points, [1, 4])


def test_scaling_section_renders_and_round_trips(points, tmp_path):
    data = ReportData("tiny", [ModelResult("tiny", device="cpu", batch_size=2, scaling=points)])
    html_path, json_path = write_report(data, tmp_path)
    page = html_path.read_text()
    assert 'id="scaling"' in page and "fall back to sequential at large batch" in page
    table = re.search(r'<table class="scaling-table">.*?</table>', page).group(0)
    assert table.count("<tr>") == 1 + len(points)
    for p in points:
        assert f"<tr><td>{p.batch_size}</td>" in table and f"{p.speedup:.2f}x" in table
    match = re.search(r'<figure id="scaling-tiny"><img [^>]*src="data:image/png;base64,([^"]+)"', page)
    assert match and base64.b64decode(match.group(1))[:8] == b"\x89PNG\r\n\x1a\n"
    (figure,) = [f for f in json.loads(json_path.read_text())["figures"] if f["id"] == "scaling-tiny"]
    assert figure["batch_size"] == [1, 4] and figure["speedup"] == [p.speedup for p in points]
    assert figure["bound"] == [p.bound_speedup for p in points]
    assert ReportData.from_json((tmp_path / "report-data.json").read_text()) == data


def test_the_headline_says_where_plans_pay_and_every_figure_is_a_file(tmp_path):
    def point(batch, speedup, fallback=None):
        return ScalingPoint(batch, 1.0, 1.0 / speedup, speedup, 10.0, "plan", fallback)

    grid = base64.b64encode((REPO / "docs" / "demo-grid.png").read_bytes()).decode()
    mixed = ModelResult("demo", device="cpu", scaling=[point(1, 2.5), point(16, 1.02, "raced 0.98x")],
                        runs=[SamplerResult("sequential", 1.0, 1, grid_png=grid), SamplerResult("auto plan", 1.0, 1)])
    headline = ("demo on cpu: the auto plan pays at batch size 1 (2.50x) over sequential sampling, not at 16 "
                "(1.02x), where it stays sequential.")
    assert where_plans_pay(mixed) == headline
    assert where_plans_pay(ModelResult("demo", scaling=[point(1, 1.05)])).startswith(
        "demo on cpu: plans do not pay at any batch size measured (1 (1.05x))")
    assert where_plans_pay(ModelResult("demo", scaling=[point(1, 3.0), point(8, 1.5)])) == (
        "demo on cpu: the auto plan pays at batch size 1 (3.00x), 8 (1.50x) over sequential sampling.")
    assert where_plans_pay(ModelResult("demo")) is None
    html_path, _ = write_report(ReportData("t", [mixed]), tmp_path)
    assert headline in html_path.read_text()
    assert headline in summary_text(RunResult(RunConfig(output="o"), SamplingSpec(), model_result=mixed))
    files = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert files == ["samples-demo-sequential.png", "scaling-demo.png"]
    assert all((tmp_path / "figures" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)


def test_no_scaling_no_section_and_old_report_data_loads():
    page, figures = render_html(ReportData("tiny", [ModelResult("tiny")]))
    assert 'id="scaling"' not in page and figures["figures"] == []
    old = ReportData("tiny", [ModelResult("tiny")]).to_dict()
    del old["models"][0]["scaling"]  # report-data.json written before the section existed
    assert ReportData.from_dict(old).models[0].scaling == []


def test_scaling_option_default_validation_and_demo():
    assert RunConfig(output="x").report.scaling_batch_sizes == []
    message = "report.scaling_batch_sizes[1]: Input should be greater than or equal to 1 (got 0)"
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(RunConfig, {"output": "x", "report": {"scaling_batch_sizes": [1, 0]}}, "", ConfigError)
    assert RunConfig.load(REPO / "jobs" / "configs" / "demo.yaml").report.scaling_batch_sizes == [1]


def test_pipeline_report_measures_scaling_in_a_worker(ray_local, tmp_path, tiny8x8_checkpoint_path):
    """Turning the option on re-runs only the report; the run's batch size is a point taken from the
    comparison (its auto plan, its timings), the others are profiled and planned in the worker."""
    ckpt = tiny8x8_checkpoint_path
    d = {"name": "tiny", "output": str(tmp_path / "out"), "model": {"checkpoint": str(ckpt), "in_channels": 1},
         "calibration": {"num_images": 2}, "plan": {"tol": TOL}, "sampling": {"batch_size": 4, "seed": 3},
         "samples": {"num_samples": 8, "shard_size": 8}, "fid": {"enabled": False},
         "resources": {"profile": {"num_cpus": 0.5}, "generate": {"actors": 1, "num_cpus": 0.5}}}
    first = pipeline.run(validate(RunConfig, d, "", ConfigError))
    assert first.model_result.scaling == []
    assert 'id="scaling"' not in (tmp_path / "out" / "report.html").read_text()

    result = pipeline.run(validate(RunConfig, {**d, "report": {"scaling_batch_sizes": [1]}}, "", ConfigError))
    assert [(s.name, s.skipped) for s in result.stages] == [("profile", True), ("plan", True), ("generate", True),
                                                           ("report", False)]
    mr = result.model_result
    _check_points(mr.scaling, [1, 4])
    own, planned = mr.scaling[1], mr.run("auto plan")
    assert own.plan == result.plan.summary() and own.fallback == result.plan.evidence.get("fallback")
    assert own.speedup == pytest.approx(planned.speedup) and own.max_abs_error == planned.max_abs_error
    assert own.plan_seconds == pytest.approx(planned.seconds / 4)
    assert 'id="scaling-tiny"' in (tmp_path / "out" / "report.html").read_text()
