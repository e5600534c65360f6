"""workflows.runtime: one way to reach Ray, and a private Ray that leaves nothing behind."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

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
