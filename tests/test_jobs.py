"""The nightly job: its regression gate, its history, its config (the job itself runs in test_nightly_job)."""
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import yaml

from workflows.config import ConfigError, NightlyConfig, Thresholds
from workflows.pipeline.nightly import check_regressions, record
from workflows.storage.history import HistoryRow, read_history

REPO = Path(__file__).resolve().parents[1]


# ---- nightly regression gate -------------------------------------------------------------------------------------

def _row(day: int, speedup: float, fid: float | None = 10.0, error: float = 1e-4, model: str = "demo") -> HistoryRow:
    t = datetime(2026, 11, 1, 3, tzinfo=timezone.utc) + timedelta(days=day)
    return HistoryRow(t.isoformat(), model, "abc", "auto plan", "p1", "cpu", 16, 1.0, 1.0 / speedup, speedup, 100,
                      30, error, 9.9, fid, "mnist5k", 200, {"hand 4-4-8-8": {"speedup": 1.5}})


def test_gate_flags_speedup_fid_and_error_regressions():
    t = Thresholds(max_speedup_drop=0.2, max_fid_rise=0.1, max_abs_error=1e-3)
    base = [_row(0, 3.0, 10.0)]
    assert check_regressions(_row(1, 2.5, 10.9), base, t) == []  # within 20% / 10%
    assert "speedup 2.30x < 2.40x" in check_regressions(_row(1, 2.3), base, t)[0]
    assert "FID 11.200 > 11.000" in check_regressions(_row(1, 3.0, 11.2), base, t)[0]
    assert "max |error| vs sequential 2.00e-03" in check_regressions(_row(1, 3.0, error=2e-3), base, t)[0]
    assert "no FID this run" in check_regressions(_row(1, 3.0, None), base, t)[0]
    assert check_regressions(_row(1, 0.1), [_row(0, 3.0, model="other")], t) == [], "first run of a model passes"
    nan = check_regressions(_row(1, float("nan")), base, t)
    assert nan and "speedup nan" in nan[0]


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


def test_a_history_folder_with_a_stray_or_foreign_file_is_named(tmp_path):
    """A junk file or another table in the history folder: a message naming it (also from `report`), not an
    Arrow or TypeError traceback; a file from before the accelerator and run-id columns still reads."""
    import os
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    from workflows.storage.history import SCHEMA, HistoryError, append_history

    history = tmp_path / "history"
    append_history(str(history), [_row(0, 3.0)])
    old = [f.name for f in SCHEMA if f.name not in ("accelerator", "run_id")]
    pq.write_table(pa.table({n: [getattr(_row(1, 2.0), n) if n != "others" else "{}"] for n in old},
                            schema=pa.schema([SCHEMA.field(n) for n in old])), history / "rows-old.parquet")
    assert [(r.speedup, r.accelerator, r.run_id) for r in read_history(str(history))] == [(3.0, "", ""), (2.0, "", "")]
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
