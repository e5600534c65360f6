"""workflows.runtime: one way to reach Ray, and a private Ray that leaves nothing behind."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import our_ray_processes

from workflows import runtime
from workflows.config import Resources
from workflows.reaper import descendants

DRIVER = textwrap.dedent("""
    import os, sys, time
    from workflows import runtime
    runtime.connect()
    print("READY", flush=True)
    time.sleep(600)
""")


@pytest.mark.slow
def test_a_private_ray_leaves_no_process_when_its_driver_is_killed():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert driver.stdout.readline().strip() == "READY"
        time.sleep(2)  # the agents start just after ray.init returns
        started = descendants(driver.pid)
        titles = {open(f"/proc/{p}/cmdline").read().split("\0")[0] for p in started if os.path.exists(f"/proc/{p}")}
        assert any("raylet" in t for t in titles) and any("DashboardAgent" in t for t in titles), titles
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    deadline = time.time() + 30
    while time.time() < deadline:
        left = [p for p, start in started.items() if os.path.exists(f"/proc/{p}")
                and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[19] == str(start)]
        if not left:
            break
        time.sleep(0.5)
    assert not left, f"left behind: {[open(f'/proc/{p}/cmdline').read() for p in left]}"


def test_dashboard_addresses_are_refused_with_the_command_to_use(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(runtime.ClusterError, match="is a dashboard address.*ray job submit --address "
                                                   "http://127.0.0.1:8265"):
        runtime.connect()


def test_threads_never_depend_on_the_worker_count():
    assert {runtime.worker_threads(Resources(actors=n)) for n in (1, 2, 8)} == {1}
    assert runtime.worker_threads(Resources(actors=3, num_cpus=4)) == 4
    assert runtime.worker_threads(Resources(num_cpus=0.5)) == 1


def test_a_pool_never_claims_every_cpu(ray_local):
    """ray#44687: an actor pool that takes every CPU deadlocks a small machine as soon as anything else
    needs one. Unsized workers ask for a share below the whole cluster (here 2 CPUs), at most one each."""
    total = runtime.ray.cluster_resources()["CPU"]
    for actors in (1, 2, 3, 8):
        cpus, gpus, threads = runtime.worker_options(Resources(actors=actors))
        assert cpus * actors < total and cpus <= 1.0 and (gpus, threads) == (0.0, 1)
    assert runtime.worker_options(Resources(actors=2, num_cpus=0.25, num_gpus=1)) == (0.25, 1, 1)


def test_a_pool_whose_workers_cannot_start_ends_at_once_with_their_error(ray_local):
    """A constructor that raises kills a Ray actor, and a pool that kept asking it to start spun for good (the
    driver's Ray log grew by GBs a minute). The pool ends with the worker's own error, in seconds."""
    class Broken(runtime.Worker):  # local: Ray ships it by value to the actors
        def __init__(self, path, threads):
            super().__init__(threads)
            raise ValueError(f"{path} is not what this worker needs")

    # "at once" against the start timeout: a pool that retried would end at 600 s if at all; two actors start,
    # raise and are reported in seconds, or a minute or two on a loaded 2-core box
    start = time.monotonic()
    with pytest.raises(runtime.ClusterError, match="test worker could not start: ValueError: W.pth is not what"):
        with runtime.ActorPool(Broken, ("W.pth",), Resources(actors=2, num_cpus=0.5), "test",
                               start_timeout_s=600) as pool:
            list(pool.map_unordered([(Broken.ready, ())]))
    assert time.monotonic() - start < 150


def test_a_worker_killed_while_idle_and_restarted_by_ray_is_started_again_with_its_arguments(ray_local):
    """An actor killed between units is restarted by Ray before the pool hears of it: the next unit reaches a
    fresh actor. It must get the worker's arguments again (a reference the pool holds: ray#53727) and run the
    unit, the death counted, rather than run it on no worker."""
    class Held(runtime.Worker):  # local: Ray ships it by value to the actors
        def __init__(self, table, threads):
            super().__init__(threads)
            self.table = table

        def look_up(self, key):
            return os.getpid(), self.table[key]

    table = runtime.ray.put({k: k * k for k in range(8)})
    with runtime.ActorPool(Held, (table,), Resources(actors=1, num_cpus=0.5), "test", start_timeout_s=60) as pool:
        [(_, (pid, _))] = list(pool.map_unordered([(Held.look_up, (0,))]))
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not [p for p in our_ray_processes("ray::Held") if p != pid]:  # Ray restarted it, the pool does not know
            assert time.monotonic() < deadline, "Ray did not restart the killed actor"
            time.sleep(0.2)
        time.sleep(1.0)
        results = dict(pool.map_unordered([(Held.look_up, (k,)) for k in range(8)]))
        assert {k: v for k, (_, v) in results.items()} == {k: k * k for k in range(8)}
        assert pool.replacements == 1 and pid not in {p for p, _ in results.values()}


def _ray_temp_dir() -> str:
    # a short path of our own: Ray's socket paths have a length limit, and its logs are measured and removed
    return tempfile.mkdtemp(prefix="ray-", dir="/tmp")


def _size(root: str) -> int:
    return sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file())


def test_fid_with_weights_that_are_not_inception_weights_ends_with_a_message(tmp_path):
    """`fid --extractor inception-v3-compat --extractor-weights W` with W a harmless wrong file stayed at 0/N
    forever while the driver's Ray log filled the disk (~4 GB a minute). It ends naming the file and what it
    lacks, and its Ray writes under 50 MB (its own RAY_TMPDIR, removed after): the size is the check of the
    spin; the time allows a whole CLI (imports, a private Ray, an actor) on a loaded 2-core box."""
    limit_s = 180
    weights = tmp_path / "W.pth"
    torch.save({"a": torch.zeros(1)}, weights)
    ray_tmp = _ray_temp_dir()
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": ray_tmp}
    command = [shutil.which("tarflow-gs"), "fid", "--samples", "mnist5k", "--reference", "mnist5k", "--extractor",
               "inception-v3-compat", "--extractor-weights", str(weights), "--no-progress"]
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"still running after {limit_s} s; its Ray wrote {_size(ray_tmp) >> 20} MB")
    finally:
        written = _size(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert time.monotonic() - start < limit_s and proc.returncode == 1 and "Traceback" not in err, err
    assert f"{weights} is not torch-fidelity's Inception-v3 weights" in " ".join(err.split()), err
    assert written < 50 << 20


@pytest.mark.slow
def test_ctrl_c_twice_ends_without_a_traceback(tmp_path):
    """Ctrl-C during generation, then again and again while Ray shuts down: no traceback from Ray's atexit
    shutdown, no crash by a signal; the command says it was aborted."""
    ray_tmp = _ray_temp_dir()
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": ray_tmp}
    proc = subprocess.Popen([shutil.which("tarflow-gs"), "generate", "--checkpoint", "demo", "--num-samples", "64",
                             "--batch-size", "4", "--out", str(tmp_path / "out"), "--progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        seen = b""
        while b"generate:" not in seen and proc.poll() is None:  # the bar: the pool is sampling
            seen += proc.stderr.read1(4096)
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 5
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
        err = (seen + proc.communicate(timeout=60)[1]).decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 1 and "Traceback" not in err and "Aborted!" in err, (proc.returncode, err[-2000:])


def test_sigterm_that_ray_turns_into_a_plain_keyboard_interrupt_still_exits_143(monkeypatch):
    """A SIGTERM handled while the driver waits in Ray's C++ (`ray.wait`, `ray.get`) reaches the command as a plain
    KeyboardInterrupt: Ray's `check_signals` (_raylet.pyx) catches what the handler raised and raises its own.
    The command still says it was SIGTERM and exits 143 (once "Aborted!", exit 1, when the signal landed there)."""
    import click
    from click.testing import CliRunner

    from workflows import interrupt
    from workflows.cli import _Group

    @click.group(cls=_Group)
    def cli():
        pass

    @cli.command()
    def wait():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs here, as inside one of Ray's waits
        except KeyboardInterrupt:
            raise KeyboardInterrupt() from None  # what Ray's check_signals does with it

    monkeypatch.setattr(interrupt, "RECEIVED", interrupt.threading.Event())
    before = signal.getsignal(signal.SIGTERM)
    try:
        result = CliRunner().invoke(cli, ["wait"])
    finally:
        signal.signal(signal.SIGTERM, before)
    assert result.exit_code == 143, result.output
    assert "wait: stopped by SIGTERM; finished work is kept" in result.output
