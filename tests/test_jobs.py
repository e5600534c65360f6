"""Job entrypoints: `ray job submit` of jobs/fid_set.py to a head this test starts, and the nightly regression gate."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import yaml
from conftest import make_tiny_model

from tarflow import save_checkpoint
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


# ---- ray job submit to a head started here ---------------------------------------------------------------------

def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _own_processes(marker: str) -> list[int]:
    """PIDs whose command line mentions this head's private temp dir: the processes this test started."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in out.splitlines() if marker in line and "ps -eo" not in line]


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head` on loopback with auth disabled, its own temp dir and ports; stopped only by its own PIDs.

    `ray stop` would stop every Ray on the machine (other test sessions too), so the head runs with
    --block in its own process group and the teardown signals that group and any straggler by PID."""
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dash, client, agent, agent_grpc, metrics, runtime_env = _free_ports(7)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(Path(temp_dir) / "head.log", "w")
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={runtime_env}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"Ray head did not start: {(Path(temp_dir) / 'head.log').read_text()[-2000:]}")
            time.sleep(1)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        for pid in _own_processes(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_fid_set(ray_head, tmp_path):
    address, env = ray_head
    ckpt = save_checkpoint(make_tiny_model(), tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny-job", "output": str(out), "model": {"checkpoint": str(ckpt), "in_channels": 1},
        "calibration": {"data": None, "num_images": 4},
        "sampling": {"batch_size": 4}, "samples": {"num_samples": 16, "shard_size": 8},
        "fid": {"extractor": "mnist5k-classifier", "reference": "digits"},
        "resources": {"profile": {"num_cpus": 1}, "generate": {"actors": 1, "num_cpus": 0.5},
                      "fid": {"actors": 1, "num_cpus": 0.5}}}))
    job = subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", address,
         "--working-dir", str(REPO), "--", "python", "jobs/fid_set.py", str(config)],
        env=env, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout
    index = json.loads((out / "run.json").read_text())
    assert [s["name"] for s in index["stages"]] == ["profile", "plan", "generate", "fid", "report"]
    assert index["fid"]["sample_count"] == 16 and index["fid"]["fid"] > 0
    assert f"FID: {index['fid']['fid']:.4f}" in job.stdout
    assert all(s["workers"] for s in index["stages"]), "every stage says where its work ran"
    manifest = json.loads((Path(index["samples"]) / "_manifest.json").read_text())
    assert sum(s["rows"] for s in manifest["shards"]) == 16
    shards = sorted(str(p) for p in Path(index["samples"]).glob("*.parquet"))
    ids = pads.dataset(shards, format="parquet").to_table(columns=["sample_id"]).column(0).to_pylist()
    assert sorted(ids) == list(range(16))
    print({s["name"]: round(s["seconds"], 1) for s in index["stages"]})
    assert (out / "report.html").is_file() and 'id="summary-table"' in (out / "report.html").read_text()
