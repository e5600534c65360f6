"""Remote stores that cannot be used, and a Ray cluster that cannot be joined, end a command with a message
naming the store (or address) and what to check, within a stated time: no traceback, no hang; SIGTERM ends
a run with a message too. Every store is aimed at loopback only: a local server that
accepts and never answers, a closed port for the cloud metadata services, no credentials anywhere."""
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 2  # TARFLOW_GS_STORE_TIMEOUT_S for these commands
BOUND_S = 150  # the whole command, Python and model load included, ends within this
pytestmark = pytest.mark.slow  # each case waits out the store's deadlines in a subprocess


@pytest.fixture(scope="module")
def silent_server():
    """A TCP server on loopback that accepts every connection and never answers: its port."""
    server = socket.create_server(("127.0.0.1", 0))
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.5)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.fixture(scope="module")
def closed_port():
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def _env(silent_server, closed_port, **extra):
    """No credentials for any store; every endpoint and metadata service on loopback."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "GOOGLE_", "GCE_", "STORAGE_EMULATOR", "CLOUDSDK")) and k != "RAY_ADDRESS"}
    return {**env, "RAY_AUTH_MODE": "disabled", "TARFLOW_GS_STORE_TIMEOUT_S": str(DEADLINE_S),
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{silent_server}",
            "GCE_METADATA_HOST": f"127.0.0.1:{closed_port}", "GCE_METADATA_IP": f"127.0.0.1:{closed_port}",
            "NO_GCE_CHECK": "true", "CLOUDSDK_CONFIG": "/nonexistent", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{silent_server}", **extra}


def _run(args, env):
    start = time.monotonic()
    result = subprocess.run([shutil.which("tarflow-gs"), *args], env=env, capture_output=True, text=True,
                            timeout=BOUND_S + 60)
    return result, time.monotonic() - start


def _generate(out, checkpoint="demo"):
    return ["generate", "--checkpoint", checkpoint, "--num-samples", "4", "--batch-size", "4", "--out", out,
            "--no-progress"]


def _message(result, seconds, *expected):
    assert seconds < BOUND_S, f"took {seconds:.0f}s"
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for text in expected:
        assert re.search(text, result.stderr), result.stderr[-2000:]


@pytest.mark.parametrize("out, expected", [
    # an endpoint that never answers (a GCS client without credentials once blocked here for good)
    ("gs://bucket-x/set", [r"gs://bucket-x could not .*no answer within the deadline", "GOOGLE_APPLICATION_CREDENTIALS",
                           "STORAGE_EMULATOR_HOST"]),
    # no credentials at all: said before any request
    ("s3://bucket-x/set", [r"s3://bucket-x could not .*NoCredentialsError", "AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL"]),
    ("hdfs://127.0.0.1:1/set", [r"hdfs://127.0.0.1:1 could not be opened"]),
])
def test_an_unusable_output_store_is_a_message_within_a_bound(out, expected, silent_server, closed_port):
    _message(*_run(_generate(out), _env(silent_server, closed_port)), *expected)


def test_an_s3_endpoint_that_never_answers_is_a_message_within_a_bound(silent_server, closed_port):
    env = _env(silent_server, closed_port, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
               AWS_DEFAULT_REGION="us-east-1")
    _message(*_run(_generate("s3://bucket-x/set"), env), r"s3://bucket-x could not .*no answer within the deadline")


def test_a_checkpoint_uri_without_credentials_is_a_message(silent_server, closed_port):
    result, seconds = _run(_generate("out", checkpoint="s3://bucket-x/model.safetensors"),
                           _env(silent_server, closed_port))
    _message(result, seconds, r"checkpoint s3://bucket-x/model.safetensors: cannot read it \(NoCredentialsError",
             "credentials and endpoint")


def test_the_shipped_configs_placeholder_bucket_is_a_message(tmp_path, silent_server, closed_port):
    """The published models' configs ship `output: s3://<bucket>/...`: a run with it says to fill it in."""
    placeholder = next(line for line in (REPO / "jobs/configs/imagenet128.yaml").read_text().splitlines()
                       if line.startswith("output:"))
    config = tmp_path / "run.yaml"
    config.write_text("\n".join(placeholder if line.startswith("output:") else line
                                for line in (REPO / "jobs/configs/demo.yaml").read_text().splitlines()))
    _message(*_run(["run", str(config), "--no-progress"], _env(silent_server, closed_port)),
             r"'<bucket>' is not a bucket name", "give the bucket")
    _message(*_run(_generate("s3://<bucket>/set"), _env(silent_server, closed_port)), r"'<bucket>' is not a bucket")


def test_a_cluster_that_accepts_but_never_answers_is_a_message_within_a_bound(tmp_path, silent_server, closed_port):
    """Ray itself retries such an address for about ten minutes, printing only its own warnings."""
    env = _env(silent_server, closed_port, RAY_ADDRESS=f"127.0.0.1:{silent_server}", TARFLOW_GS_CONNECT_TIMEOUT_S="5")
    result, seconds = _run(_generate(str(tmp_path / "out")), env)
    _message(result, seconds, rf"cannot join the Ray cluster at RAY_ADDRESS=127.0.0.1:{silent_server}: it accepts "
                              r"connections but Ray did not answer within 5s", "unset RAY_ADDRESS")
    assert not (tmp_path / "out" / "_manifest.json").exists(), "nothing is written before the cluster is joined"


def test_sigterm_stops_a_run_as_ctrl_c_does_and_the_same_command_resumes(tmp_path):
    """What Kubernetes sends: once Ray's C++ dump and exit 15 or 134 mid-write; now a one-line message, exit 143
    (128 + SIGTERM), the lease released, every finished shard kept."""
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "disabled"}
    out = tmp_path / "out"
    args = [shutil.which("tarflow-gs"), "generate", "--checkpoint", "demo", "--num-samples", "400", "--batch-size", "4",
            "--shard-size", "8", "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + BOUND_S
    while not list((out / "_shards").glob("*.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stdout[-2000:] + stderr[-3000:]
    assert "generate: stopped by SIGTERM; finished work is kept" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr and "SIGTERM received" not in stderr, stderr[-3000:]
    assert not (out / "_lease.json").exists()
    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=BOUND_S + 60)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    done = int(re.search(r"\((\d+) already done\)", resumed.stdout).group(1))
    assert 1 <= done < 50, resumed.stdout
