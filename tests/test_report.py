"""The report renders every section from real comparison data, and its figures round-trip as JSON."""
import base64
import json
import re

import numpy as np
import pytest
from conftest import make_tiny_model

from tarflow import GSJacobi, Jacobi, Plan, SamplingSpec, sample_ids
from workflows.report import SECTIONS, ReportData, grid_png, render_html, write_report
from workflows.stages.compare import compare_plans
from workflows.storage.history import HistoryRow


def _history_row(day: int, speedup: float, fid: float) -> HistoryRow:
    return HistoryRow(f"2026-11-{day:02d}T03:00:00+00:00", "tiny", "h", "auto", "p", "cpu", 4, 1.0, 1 / speedup,
                      speedup, 60, 30, 1e-5, 4.0, fid, "mnist5k-classifier", 100)


@pytest.fixture(scope="module")
def data():
    model = make_tiny_model()
    T = model.num_tokens
    plans = {"auto": Plan.uniform(4, T, GSJacobi(segment_len=8, tol=1e-5)),
             "jacobi": Plan.uniform(4, T, Jacobi(tol=1e-5)),
             "one pass": Plan.uniform(4, T, Jacobi(tol=0.0, max_iters=1))}
    metrics = [{"crm_share": s, "igm_z": 1.0 + i, "igm_zeros": 10.0 - i} for i, s in enumerate([0.1, 0.2, 0.3, 0.4])]
    result = compare_plans(model, plans, SamplingSpec(batch_size=4), name="tiny", block_metrics=metrics)
    history = [_history_row(d, 2.0 + 0.1 * d, 5.0 - 0.1 * d) for d in range(1, 4)]
    return ReportData("tiny nightly", [result], history, ["config: test"])


def test_comparison_is_on_the_same_noise(data):
    """Sequential and every plan sample ids 0..n-1 exactly as the generate stage draws them: converged plans
    land within float error of sequential, a one-iteration plan far from it, and the grids are those ids."""
    m = data.models[0]
    assert [r.plan for r in m.runs] == ["sequential", "auto", "jacobi", "one pass"]
    for r in m.runs[1:3]:
        assert r.max_abs_error < 1e-4, "converged plans reproduce sequential sampling on the same noise"
    assert m.runs[3].max_abs_error > 1e-2 and m.runs[3].passes == 4 < m.runs[0].passes
    model = make_tiny_model()
    spec = SamplingSpec(batch_size=4).for_model(10)
    assert m.runs[0].grid_png == grid_png(sample_ids(model, spec, range(4)).images)
    assert [b.solver for b in m.blocks] == ["gs_jacobi"] * 4 and m.blocks[3].crm_share == 0.4
    assert len(m.convergence) == 4 and all(c.values[-1] < c.values[0] for c in m.convergence)


def test_report_renders_all_sections(data, tmp_path):
    html_path, json_path = write_report(data, tmp_path)
    page = html_path.read_text()
    for section in SECTIONS:
        assert f'id="{section}"' in page
    assert 'id="summary-table"' in page and page.count("<tr>") >= 1 + 4 + 1 + 4  # header + 4 runs, header + 4 blocks
    for figure in ("blocks-tiny", "convergence-tiny", "history"):
        match = re.search(rf'<figure id="{figure}"><img [^>]*src="data:image/png;base64,([^"]+)"', page)
        assert match, f"figure {figure} missing"
        assert base64.b64decode(match.group(1))[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.count('class="grid"') == 4, "one sample grid per sampler"
    assert "src=\"http" not in page and "<script" not in page, "self-contained: nothing fetched"
    figures = json.loads(json_path.read_text())
    assert {f["id"] for f in figures["figures"]} == {"blocks-tiny", "convergence-tiny", "history"}
    again = ReportData.from_json((tmp_path / "report-data.json").read_text())
    assert again == data


def test_report_without_history_or_blocks_says_so():
    page, figures = render_html(ReportData("empty"))
    assert page.count("no data") == 4 and figures["figures"] == []


def test_grid_png_is_square_and_scaled():
    from io import BytesIO

    from PIL import Image

    img = Image.open(BytesIO(base64.b64decode(grid_png(np.zeros((16, 1, 8, 8), np.float32)))))
    assert img.width == img.height >= 128


def test_report_cli_combines_run_data_and_history(data, tmp_path):
    from click.testing import CliRunner

    from workflows.cli import main
    from workflows.storage.history import append_history

    (tmp_path / "a.json").write_text(data.to_json())
    history = str(tmp_path / "history.parquet")
    append_history(history, [HistoryRow("2026-11-05T03:00:00+00:00", "tiny", "h", "auto plan", "p", "cpu", 4, 1.0,
                                        0.5, 2.0, 60, 30, 1e-5, None, 4.5, "mnist5k-classifier", 100)])
    result = CliRunner().invoke(main, ["report", "--data", str(tmp_path / "a.json"), "--history", history,
                                       "--title", "morning", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "out" / "report.json").read_text())
    history_fig = next(f for f in figures["figures"] if f["id"] == "history")
    assert history_fig["series"]["tiny / auto plan"]["speedup"] == [2.0], "the table's history replaces the file's"
    assert "<title>morning</title>" in (tmp_path / "out" / "report.html").read_text()
    assert CliRunner().invoke(main, ["report", "--out", str(tmp_path / "x")]).exit_code == 2


def test_report_data_checks_every_number_and_field(data, tmp_path):
    """`report-data.json` (what `report --data` renders): a number out of range, NaN or inf, or an unknown
    field, is named by its dotted path (NaN and unknown fields were rendered as they were); values are
    checked when an object is made or assigned too. Not measured: None (a FID, a block metric)."""
    import math
    from dataclasses import replace

    from click.testing import CliRunner
    from pydantic import ValidationError

    from tarflow.schema import SchemaError
    from workflows.cli import main

    good = data.to_dict()
    assert ReportData.from_dict(good) == data
    cases = [(("models", 0, "runs", 1, "speedup"), math.nan, "models[0].runs[1].speedup: Input should be a finite"),
             (("models", 0, "runs", 0, "seconds"), -1.0, "models[0].runs[0].seconds: Input should be greater than 0"),
             (("models", 0, "runs", 2, "fid"), math.inf, "models[0].runs[2].fid: Input should be a finite number"),
             (("models", 0, "runs", 0, "passes"), 0, "models[0].runs[0].passes: Input should be greater than 0"),
             (("models", 0, "blocks", 3, "crm_share"), 1.5, "models[0].blocks[3].crm_share: Input should be less than"),
             (("models", 0, "blocks", 0, "igm_z"), math.nan, "models[0].blocks[0].igm_z: Input should be a finite"),
             (("models", 0, "convergence", 1, "values", 0), -0.5, "models[0].convergence[1].values[0]: Input should"),
             (("models", 0, "fid_num_samples"), -1, "models[0].fid_num_samples: Input should be greater than or equal"),
             (("history", 0, "speedup"), math.inf, "history[0].speedup: Input should be a finite number"),
             (("models", 0, "gpu"), "a10g", "models[0].gpu: unknown field"),
             (("subtitle",), "x", "subtitle: unknown field")]
    for path, value, named in cases:
        with pytest.raises(SchemaError, match=re.escape(f"report data.{named}")):
            ReportData.from_dict(_with(good, path, value))
    (tmp_path / "nan.json").write_text(json.dumps(_with(good, cases[0][0], math.nan)))
    result = CliRunner().invoke(main, ["report", "--data", str(tmp_path / "nan.json"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"nan.json: report data.{cases[0][2]}" in result.output and not (tmp_path / "o").exists()
    run = data.models[0].runs[1]
    with pytest.raises(ValidationError):
        run.fid = math.nan  # a FID is assigned after the comparison ran: checked all the same
    with pytest.raises(ValidationError):
        replace(run, max_abs_error=-1.0)


def _with(d: dict, path: tuple, value) -> dict:
    """A copy of the JSON form `d` with `value` at `path`."""
    d = json.loads(json.dumps(d))
    target = d
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return d
