"""The nightly job end to end: `python jobs/nightly.py CONFIG` runs every model fresh (auto plan, a hand
plan, the sequential FID), appends to the history, writes the report, and exits 1 on a regression."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_tiny_model

from tarflow import save_checkpoint
from workflows.storage.history import HistoryRow, append_history, read_history

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_nightly_job_measures_appends_reports_and_fails_on_a_regression(tmp_path):
    ckpt = save_checkpoint(make_tiny_model(), tmp_path / "tiny.safetensors")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "output": "unused", "model": {"checkpoint": str(ckpt), "in_channels": 1},
        "calibration": {"num_images": 2}, "plan": {"tol": 1e-3}, "sampling": {"batch_size": 4},
        "samples": {"num_samples": 16, "shard_size": 8}, "fid": {"reference": "digits"},
        "resources": {"profile": {"num_cpus": 0.5}, "generate": {"num_cpus": 0.5}, "fid": {"num_cpus": 0.5}}}))
    history = tmp_path / "history.parquet"
    config = tmp_path / "nightly.yaml"
    config.write_text(yaml.safe_dump({"history": str(history), "output": str(tmp_path / "nights"),
                                      "models": [{"config": "tiny.yaml", "hand_plans": ["3-2-8-4"]}]}))
    # the last passing night was 1000x faster: tonight's speedup is a regression however the clock runs
    append_history(str(history), [HistoryRow("2026-11-30T03:00:00+00:00", "tiny", "h", "auto plan", "p", "cpu", 4,
                                             1.0, 0.001, 1000.0, 60, 1, 0.0, None, None)])
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "disabled"}
    night = subprocess.run([sys.executable, str(REPO / "jobs" / "nightly.py"), str(config)], env=env,
                           capture_output=True, text=True, timeout=600)
    assert night.returncode == 1, night.stdout[-2000:] + night.stderr[-3000:]
    assert "REGRESSION: tiny: speedup" in night.stdout and "vs sequential" in night.stdout
    rows = read_history(str(history))
    assert len(rows) == 2 and rows[-1].passed is False and rows[-1].fid_plan is not None
    assert rows[-1].fid_sequential is not None and set(rows[-1].others) == {"hand 3-2-8-4"}
    assert rows[-1].others["hand 3-2-8-4"]["fid"] is not None
    report = next((tmp_path / "nights").glob("*/report.html")).read_text()
    assert "REGRESSION: tiny: speedup" in report and 'id="history"' in report
    data = json.loads(next((tmp_path / "nights").glob("*/report-data.json")).read_text())
    assert [r["plan"] for r in data["models"][0]["runs"]] == ["sequential", "auto plan", "hand 3-2-8-4"]
