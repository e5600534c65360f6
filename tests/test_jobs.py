"""The nightly job: its regression gate, its history, its config (the job itself runs in test_nightly_job)."""
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import yaml
from pydantic import ValidationError

from workflows.config import ConfigError, NightlyConfig, Thresholds
from workflows.pipeline.nightly import (NightlyResult, baseline, check_regressions, record, run_nightly,
                                        summary_text)
from workflows.storage.history import HistoryRow, read_history

REPO = Path(__file__).resolve().parents[1]


# ---- nightly regression gate -------------------------------------------------------------------------------------

def _row(day: int, speedup: float, fid: float | None = 10.0, error: float = 1e-4, model: str = "demo",
         accelerator: str = "NVIDIA A10G", batch_size: int = 16) -> HistoryRow:
    t = datetime(2026, 11, 1, 3, tzinfo=timezone.utc) + timedelta(days=day)
    return HistoryRow(t.isoformat(), model, "abc", "auto plan", "p1", "cuda:0", batch_size, 1.0, 1.0 / speedup,
                      speedup, 100, 30, error, 9.9, fid, "mnist5k", 200, {"hand 4-4-8-8": {"speedup": 1.5}},
                      accelerator=accelerator)


def test_gate_flags_speedup_fid_and_error_regressions():
    t = Thresholds(max_speedup_drop=0.2, max_fid_rise=0.1, max_abs_error=1e-3)
    base = [_row(0, 3.0, 10.0)]
    assert check_regressions(_row(1, 2.5, 10.9), base, t) == []  # within 20% / 10%
    assert "speedup 2.30x < 2.40x" in check_regressions(_row(1, 2.3), base, t)[0]
    assert "FID 11.200 > 11.000" in check_regressions(_row(1, 3.0, 11.2), base, t)[0]
    assert "max |error| vs sequential 2.00e-03" in check_regressions(_row(1, 3.0, error=2e-3), base, t)[0]
    assert "no FID this run" in check_regressions(_row(1, 3.0, None), base, t)[0]
    assert check_regressions(_row(1, 0.1), [_row(0, 3.0, model="other")], t) == [], "first run of a model passes"
    with pytest.raises(ValidationError, match="finite number"):
        _row(1, float("nan"))  # a speedup that is no number is no row: the gate never sees one


def test_the_gate_judges_the_plans_fid_against_sequentials_on_the_same_ids_within_its_noise(tmp_path):
    """The quality gate of one night: the plan's FID may exceed sequential's (same ids) by `fid_noise_sigmas`
    standard errors of sequential's, with or without a baseline; the errors survive the history's round trip,
    and rows written before they existed read as not compared."""
    from workflows.storage.history import append_history

    t = Thresholds(fid_noise_sigmas=2.0)
    paired = replace(_row(0, 3.0, fid=10.5), fid_sequential=10.0, fid_sequential_se=0.3, fid_difference_se=0.05)
    assert check_regressions(paired, [], t) == []  # +0.5 <= 2 x 0.3
    [problem] = check_regressions(replace(paired, fid_plan=10.7), [], t)
    assert "FID 10.700 vs sequential's 10.000 on the same ids: +0.700 > 0.600 (2 standard errors" in problem
    assert check_regressions(replace(paired, fid_plan=10.7), [], Thresholds(fid_noise_sigmas=3.0)) == []
    assert check_regressions(replace(paired, fid_plan=10.7, fid_sequential_se=None), [], t) == [], \
        "no paired FID, nothing to judge"
    append_history(str(tmp_path / "h"), [paired, _row(1, 3.0)])
    first, second = read_history(str(tmp_path / "h"))
    assert (first.fid_sequential_se, first.fid_difference_se) == (0.3, 0.05)
    assert (second.fid_sequential_se, second.fid_difference_se) == (None, None)
    assert "(difference +0.5000 +- 0.0500, sequential's noise +- 0.3000)" in summary_text(
        NightlyResult([first], [], "report.html"))


def test_the_gate_judges_any_metric_of_the_fid_pass_in_its_direction(tmp_path):
    """precision higher is better, sFID and KID lower (KID can be below 0); a metric the last night had and this one
    lacks is a regression too; the metrics survive the history's Parquet round trip."""
    from dataclasses import replace

    from workflows.storage.history import append_history, read_history

    t = Thresholds(max_metric_worsening={"precision": 0.05, "sfid": 0.1, "kid": 0.5})
    last = replace(_row(0, 3.0), metrics={"precision": 0.80, "sfid": 5.0, "kid": -0.002, "recall": 0.5})
    append_history(str(tmp_path / "h"), [last])
    [read] = read_history(str(tmp_path / "h"))
    assert read.metrics == last.metrics
    ok = {"precision": 0.77, "sfid": 5.4, "kid": -0.0015, "recall": 0.1}  # recall not gated
    assert check_regressions(replace(_row(1, 3.0), metrics=ok), [read], t) == []
    for name, value, said in (("precision", 0.75, "precision 0.75 vs 0.8"), ("sfid", 5.6, "sfid 5.6 vs 5"),
                              ("kid", -0.0009, "kid -0.0009 vs -0.002")):
        [problem] = check_regressions(replace(_row(1, 3.0), metrics={**ok, name: value}), [read], t)
        assert said in problem, problem
    [problem] = check_regressions(replace(_row(1, 3.0), metrics={"precision": 0.8, "kid": -0.0018}), [read], t)
    assert "no sfid this run" in problem
    with pytest.raises(ValidationError, match="max_metric_worsening"):
        Thresholds(max_metric_worsening={"psnr": 0.1})


def test_the_gate_compares_like_with_like():
    """A night on another GPU, at another batch size or with another FID sample count is no baseline."""
    t = Thresholds(max_speedup_drop=0.2)
    base = [_row(0, 3.0)]
    assert check_regressions(_row(1, 1.0), base, t)  # the same chip and batch: a regression
    for other in (_row(1, 1.0, accelerator="NVIDIA H100 80GB HBM3"), _row(1, 1.0, batch_size=64),
                  replace(_row(1, 1.0), fid_num_samples=50000), replace(_row(1, 1.0), model_hash="new")):
        assert check_regressions(other, base, t) == [] and baseline(other, base) is None
    assert baseline(_row(1, 1.0), base + [_row(1, 9.0, accelerator="cpu (AMD EPYC, 2 threads)")]) is base[0]


def _nightly_config(tmp_path, **fields) -> NightlyConfig:
    cfg_file = tmp_path / "nightly.yaml"
    (tmp_path / "demo.yaml").write_text("output: x\n")
    cfg_file.write_text(yaml.safe_dump({"output": str(tmp_path / "n"), "models": [{"config": "demo.yaml"}], **fields}))
    return NightlyConfig.load(cfg_file)


def test_a_night_without_a_baseline_says_so_and_can_be_made_to_fail(tmp_path):
    cfg = _nightly_config(tmp_path)
    assert cfg.history == str(tmp_path / "n" / "history"), "the history defaults to <output>/history"
    first = record(cfg, "night0", [_row(0, 3.0)], [])
    assert first.passed and any("demo: no baseline" in n for n in first.notes)
    assert "demo: no baseline: no earlier passing night" in Path(first.report).read_text()
    strict = record(cfg, "night1", [_row(1, 3.0, accelerator="NVIDIA L4")], [], require_baseline=True)
    assert not strict.passed and "no baseline" in strict.problems[0] and "--accept" in strict.problems[0]
    accepted = record(cfg, "night2", [_row(2, 3.0, accelerator="NVIDIA L4")], [], accept=True, require_baseline=True)
    assert accepted.passed and record(cfg, "night3", [_row(3, 2.9, accelerator="NVIDIA L4")], [],
                                      require_baseline=True).passed
    assert [r.passed for r in read_history(cfg.history)] == [True, False, True, True]


def test_a_retried_night_appends_no_second_row(tmp_path):
    """A retry (the same run id) of a night whose rows are recorded measures nothing and appends nothing; it
    exits with the recorded verdict."""
    cfg = _nightly_config(tmp_path)
    record(cfg, "night0", [_row(0, 3.0)], [])
    failed = record(cfg, "night1", [_row(1, 1.0)], [])
    assert not failed.passed
    again = record(cfg, "night1", [_row(1, 1.0)], [])
    assert len(read_history(cfg.history)) == 2, "one row per run"
    assert not again.passed and "run night1 recorded a regression" in again.problems[0]
    retry = run_nightly(cfg, run_id="night1")  # before any work: no Ray, no pipeline
    assert len(read_history(cfg.history)) == 2 and not retry.passed
    assert retry.report == failed.report and "measured nothing again" in summary_text(retry)
    assert run_nightly(cfg, run_id="night0").passed


def test_joining_a_cluster_with_a_local_history_is_refused_before_any_work(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "demo.yaml").write_text("output: x\n")
    for fields in ({"output": str(tmp_path / "n")}, {"output": "s3://bucket/n", "history": "runs/history"}):
        (tmp_path / "nightly.yaml").write_text(yaml.safe_dump({**fields, "models": [{"config": "demo.yaml"}]}))
        env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "127.0.0.1:9"}  # nothing listens there
        job = subprocess.run([sys.executable, str(REPO / "jobs" / "nightly.py"), str(tmp_path / "nightly.yaml")],
                             capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
        assert job.returncode == 1 and "local path" in job.stderr and "Traceback" not in job.stderr, job.stderr
        assert "joins the Ray cluster at 127.0.0.1:9" in job.stderr and "history" in job.stderr
        assert not (tmp_path / "n").exists() and not (tmp_path / "runs").exists()


def test_nightly_record_appends_history_and_gates_against_last_passing_run(tmp_path):
    cfg_file = tmp_path / "nightly.yaml"
    (tmp_path / "demo.yaml").write_text("output: x\n")
    cfg_file.write_text(yaml.safe_dump({"history": str(tmp_path / "history.parquet"), "output": str(tmp_path / "n"),
                                        "thresholds": {"max_speedup_drop": 0.2, "max_fid_rise": 0.1},
                                        "models": [{"config": "demo.yaml"}]}))
    cfg = NightlyConfig.load(cfg_file)
    nights = [(_row(0, 3.0), True), (_row(1, 2.0), False), (_row(2, 2.1), False), (_row(3, 2.9), True)]
    for i, (row, expected) in enumerate(nights):
        result = record(cfg, f"night{i}", [row], [])
        assert result.passed is expected, result.problems
        assert Path(result.report).is_file()
    history = read_history(cfg.history)
    assert [r.passed for r in history] == [True, False, False, True], "failing nights stay in the history, marked"
    assert history[0].others == {"hand 4-4-8-8": {"speedup": 1.5}}
    table = pads.dataset(cfg.history, format="parquet").to_table()
    assert table.num_rows == 4 and table.schema.field("speedup").type == "double"
    # a deliberate change is accepted as the new baseline
    accepted = record(cfg, "night4", [_row(4, 1.0)], [], accept=True)
    assert accepted.passed and record(cfg, "night5", [_row(5, 0.95)], []).passed
    page = Path(record(cfg, "night6", [_row(6, 0.5)], []).report).read_text()
    assert "REGRESSION: demo: speedup 0.50x" in page and 'id="history"' in page


def test_nightly_config_errors(tmp_path):
    f = tmp_path / "n.yaml"
    f.write_text(yaml.safe_dump({"history": "h.parquet", "output": "o", "models": [{"config": "missing.yaml"}]}))
    with pytest.raises(ConfigError, match=r"models\[0\].config='missing.yaml': no such run config"):
        NightlyConfig.load(f)
    f.write_text(yaml.safe_dump({"history": "h", "output": "o", "models": [{"config": "n.yaml"}],
                                 "thresholds": {"max_speedup_drop": 1.5}}))
    with pytest.raises(ConfigError, match="thresholds.max_speedup_drop: Input should be less than 1"):
        NightlyConfig.load(f)
    f.write_text(yaml.safe_dump({"history": "h", "output": "o", "models": [{"config": "n.yaml", "hand": "x"}]}))
    with pytest.raises(ConfigError, match=r"models\[0\].hand: unknown field; allowed here: config, hand_plans"):
        NightlyConfig.load(f)
    f.write_text(yaml.safe_dump({"history": "h", "output": "o", "models": []}))
    with pytest.raises(ConfigError, match="models: List should have at least 1 item"):
        NightlyConfig.load(f)
    assert NightlyConfig.load(REPO / "jobs" / "configs" / "nightly.yaml").models


def test_two_processes_appending_at_once_keep_both_rows(tmp_path):
    """The history is append-only, one file per append: writers never rewrite each other's rows."""
    import subprocess
    import sys

    history = tmp_path / "history.parquet"
    script = ("import sys\nfrom datetime import datetime, timezone\n"
              "from workflows.storage.history import HistoryRow, append_history\n"
              "for k in range(20):\n"
              "    append_history(sys.argv[1], [HistoryRow(datetime.now(timezone.utc).isoformat(), sys.argv[2], 'h',"
              " 'auto plan', 'p', 'cpu', 1, 1.0, 0.5, 2.0, 10, 5, 0.0)])\n")
    writers = [subprocess.Popen([sys.executable, "-c", script, str(history), name]) for name in ("a", "b")]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    rows = read_history(str(history))
    assert sorted(r.model for r in rows) == ["a"] * 20 + ["b"] * 20


def test_every_number_of_a_history_row_is_checked_when_made_and_when_read(tmp_path):
    """Seconds, speedups, passes, errors, FIDs, the batch size, the hand plans' numbers: a row with one out of
    range, NaN or inf is not made, a value is not assigned, and a history file holding one is named with
    the row and field (from `report` too), where it was read as it was and compared as NaN. A FID not
    measured is None."""
    import json
    import math
    import os
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    from workflows.storage.history import SCHEMA, HistoryError, append_history

    good = _row(0, 3.0, fid=None)
    assert good.fid_plan is None
    cases = [("speedup", math.nan, "Input should be a finite number"), ("plan_seconds", 0.0, "greater than 0"),
             ("sequential_seconds", math.inf, "finite number"), ("batch_size", 0, "greater than 0"),
             ("plan_passes", -30, "greater than 0"), ("max_abs_error", -1e-4, "greater than or equal to 0"),
             ("fid_plan", math.nan, "finite number"), ("fid_sequential", -9.9, "greater than or equal to 0"),
             ("fid_num_samples", -200, "greater than or equal to 0"),
             ("others", {"hand 4-4-8-8": {"fid": math.inf}}, "others.hand 4-4-8-8.fid: Input should be a finite"),
             ("others", {"hand 4-4-8-8": {"speeed": 1.5}}, "others.hand 4-4-8-8.speeed: unknown field")]
    history, env = tmp_path / "history", {**os.environ, "PYTHONPATH": str(REPO)}
    for i, (name, value, named) in enumerate(cases):
        with pytest.raises(ValidationError):
            replace(good, **{name: value})
        row = _row(0, 3.0)
        with pytest.raises(ValidationError):
            setattr(row, name, value)
        columns = {f.name: [getattr(good, f.name)] for f in SCHEMA}
        columns[name] = [json.dumps(value) if name == "others" else value]
        columns["others"] = [columns["others"][0] if name == "others" else "{}"]
        columns["metrics"] = ["{}"]  # the other JSON column, as written
        append_history(str(history), [good])
        pq.write_table(pa.table(columns, schema=SCHEMA), history / f"rows-{i}.parquet")
        with pytest.raises(HistoryError) as e:
            read_history(str(history))
        message = str(e.value)
        assert message.startswith(f"history {history}: rows-{i}.parquet is not a tarflow-gs history file "
                                  f"(rows[0].{name if name != 'others' else ''}") and named in message, message
        if i == 0:
            cli = subprocess.run([sys.executable, "-c", "from workflows.cli import main; main()", "report",
                                  "--history", str(history), "--out", str(tmp_path / "page")],
                                 capture_output=True, text=True, env=env, timeout=120)
            assert cli.returncode == 1 and f"rows-{i}.parquet" in cli.stderr and "rows[0].speedup" in cli.stderr \
                and "Traceback" not in cli.stderr, cli.stderr
        (history / f"rows-{i}.parquet").unlink()
    assert len(read_history(str(history))) == len(cases)


def test_a_history_folder_with_a_stray_or_foreign_file_is_named(tmp_path):
    """A junk file or another table in the history folder: a message naming it (also from `report`), not an
    Arrow or TypeError traceback; a file from before the accelerator, run-id and metrics columns still reads."""
    import os
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    from workflows.storage.history import SCHEMA, HistoryError, append_history

    history = tmp_path / "history"
    append_history(str(history), [_row(0, 3.0)])
    old = [f.name for f in SCHEMA if f.name not in ("accelerator", "run_id", "metrics")]
    pq.write_table(pa.table({n: [getattr(_row(1, 2.0), n) if n != "others" else "{}"] for n in old},
                            schema=pa.schema([SCHEMA.field(n) for n in old])), history / "rows-old.parquet")
    assert [(r.speedup, r.accelerator, r.run_id, r.metrics) for r in read_history(str(history))] == [
        (3.0, "NVIDIA A10G", "", {}), (2.0, "", "", {})]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name, write in [("notes.txt", lambda p: p.write_text("not parquet")),
                        ("other.parquet", lambda p: pq.write_table(pa.table({"a": [1]}), p)),
                        ("typed.parquet", lambda p: pq.write_table(pa.table({f.name: pa.array(
                            [None if f.name == "timestamp" else "x"], pa.string()) for f in SCHEMA}), p))]:
        write(history / name)
        with pytest.raises(HistoryError, match=rf"history {history}: {name} is not a"):
            read_history(str(history))
        cli = subprocess.run([sys.executable, "-c", "from workflows.cli import main; main()", "report", "--history", str(history), "--out",
                              str(tmp_path / "page")], capture_output=True, text=True, env=env, timeout=120)
        assert cli.returncode == 1 and name in cli.stderr and "Traceback" not in cli.stderr, cli.stderr
        (history / name).unlink()
