"""The nightly job end to end, as a cluster runs it: `python jobs/nightly.py CONFIG --output s3://... --run-id ID`
runs every model fresh (auto plan, a hand plan, the sequential FID), writes the report and the history to the
bucket, gates against the last comparable night, and exits 1 on a regression; a retry appends nothing."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from workflows.storage.files import read_bytes, resolve
from workflows.storage.history import read_history

REPO = Path(__file__).resolve().parents[1]


def _night(config: Path, output: str, run_id: str, *flags: str) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "jobs" / "nightly.py"), str(config), "--output", output,
                           "--run-id", run_id, *flags], env=env, capture_output=True, text=True, timeout=900)


def _text(uri: str) -> str:
    fs, path = resolve(uri)
    return read_bytes(fs, path).decode()


@pytest.mark.slow
def test_two_nights_on_s3_remember_and_the_second_fails_on_an_injected_regression(tmp_path, s3_bucket,
                                                                                   tiny8x8_checkpoint_path):
    ckpt = tiny8x8_checkpoint_path
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "output": "unused", "model": {"checkpoint": str(ckpt), "in_channels": 1},
        "calibration": {"num_images": 2}, "plan": {"tol": 1e-3}, "sampling": {"batch_size": 4},
        "samples": {"num_samples": 16, "shard_size": 8}, "fid": {"reference": "digits"},
        "resources": {"profile": {"num_cpus": 0.5}, "generate": {"num_cpus": 0.5}, "fid": {"num_cpus": 0.5}}}))
    config = tmp_path / "nightly.yaml"
    config.write_text(yaml.safe_dump({"output": "replaced by --output",
                                      "models": [{"config": "tiny.yaml", "hand_plans": ["3-2-8-4"]}]}))
    output = f"{s3_bucket}/nightly"
    history = f"{output}/history"  # the default: beside the nights, in the bucket

    leftovers = set(Path(tempfile.gettempdir()).glob("tarflow-gs-nightly-*"))
    first = _night(config, output, "night-1")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert "tiny: no baseline" in first.stdout
    rows = read_history(history)
    assert len(rows) == 1 and rows[0].passed and rows[0].run_id == "night-1"
    assert rows[0].accelerator.startswith("cpu (") and rows[0].device == "cpu"
    assert "tiny: no baseline" in _text(f"{output}/night-1/report.html")

    # the regression: the first night's recorded speedup made 1000x, so tonight's real one is a large drop
    fs, path = resolve(history)
    [stored] = [i.path for i in fs.get_file_info(pafs.FileSelector(path))]
    table = pq.read_table(stored, filesystem=fs)
    table = table.set_column(table.schema.get_field_index("speedup"), "speedup",
                             pa.array([rows[0].speedup * 1000]))
    with fs.open_output_stream(stored) as f:
        pq.write_table(table, f)

    second = _night(config, output, "night-2")
    assert second.returncode == 1, second.stdout[-2000:] + second.stderr[-3000:]
    assert "REGRESSION: tiny: speedup" in second.stdout and "no baseline" not in second.stdout
    rows = read_history(history)
    assert [(r.run_id, r.passed) for r in rows] == [("night-1", True), ("night-2", False)], "one row per night"
    assert rows[-1].fid_plan is not None and rows[-1].fid_sequential is not None
    assert set(rows[-1].others) == {"hand 3-2-8-4"} and rows[-1].others["hand 3-2-8-4"]["fid"] is not None
    report = _text(f"{output}/night-2/report.html")
    assert "REGRESSION: tiny: speedup" in report and 'id="history"' in report
    data = json.loads(_text(f"{output}/night-2/report-data.json"))
    assert [r["plan"] for r in data["models"][0]["runs"]] == ["sequential", "auto plan", "hand 3-2-8-4"]

    # a Kubernetes retry of the failed night reruns the entrypoint with the same id: the verdict, no new row
    retry = _night(config, output, "night-2")
    assert retry.returncode == 1 and "measured nothing again" in retry.stdout, retry.stderr[-3000:]
    assert len(read_history(history)) == 2
    # the hand plans' working folder goes with each night, a failing one too
    assert set(Path(tempfile.gettempdir()).glob("tarflow-gs-nightly-*")) == leftovers
