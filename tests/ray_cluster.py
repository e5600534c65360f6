"""A real multi-node Ray cluster on this machine, for the tests that submit jobs to one.

Every node is `ray start --block` in its own process group, with its own temporary directory and
ports, on loopback, auth off. Stopping signals those groups and any straggler whose command line
names one of the directories: `ray stop` would stop every Ray on the machine, other sessions' too.
"""
from __future__ import annotations

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
from pathlib import Path


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    kids = [int(p) for p, pp in (line.split() for line in out.splitlines()) if int(pp) == pid]
    return kids + [g for k in kids for g in _children(k)]


class LocalCluster:
    def __init__(self, head_cpus: int, head_gpus: int, workers: list[tuple[int, int]], attempts: int = 2):
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        for attempt in range(attempts):  # a port taken between choosing and binding it: start afresh
            try:
                self._up(head_cpus, head_gpus, workers)
                return
            except RuntimeError:
                if attempt == attempts - 1:
                    raise

    def _up(self, head_cpus: int, head_gpus: int, workers: list[tuple[int, int]]) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="rayc-", dir="/tmp"))  # short: Ray's socket paths are limited
        self.gcs, self.dash, client = free_ports(3)
        self.address = f"http://127.0.0.1:{self.dash}"
        self.nodes: list[subprocess.Popen] = []
        head = [f"--port={self.gcs}", "--head", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dash}", f"--ray-client-server-port={client}"]
        self._start("head", head, head_cpus, head_gpus, 27000)
        for i, (cpus, gpus) in enumerate(workers):
            self._start(f"worker{i}", [f"--address=127.0.0.1:{self.gcs}"], cpus, gpus, 28000 + 1000 * i)
        self.wait_for_nodes(1 + len(workers))

    def _start(self, name: str, args: list[str], cpus: int, gpus: int, worker_ports: int) -> None:
        # worker ports below the ephemeral range (where free_ports draws) and above Ray's default range
        # (10002-19999, which another Ray of this test session may be using)
        agent, agent_grpc, metrics, runtime_env, manager, objects = free_ports(6)
        temp = self.root / name
        temp.mkdir()
        log = open(temp / "start.log", "w")
        cmd = ["ray", "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", f"--num-gpus={gpus}",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
               f"--node-manager-port={manager}", f"--object-manager-port={objects}",
               f"--min-worker-port={worker_ports}", f"--max-worker-port={worker_ports + 999}",
               f"--temp-dir={temp}", "--disable-usage-stats", *args]
        self.nodes.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def query(self, code: str):
        """Run `code` in a driver of this cluster; it prints one JSON value, returned here."""
        script = f"import json, ray\nray.init(address='127.0.0.1:{self.gcs}', log_to_driver=False)\n{code}"
        out = subprocess.run([sys.executable, "-c", script], env=self.env, capture_output=True, text=True,
                             timeout=120)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        return json.loads(out.stdout.strip().splitlines()[-1])

    def alive_nodes(self) -> list[dict]:
        return self.query("print(json.dumps([{'id': n['NodeID'], 'resources': n['Resources']} "
                          "for n in ray.nodes() if n['Alive']]))")

    def wait_for_nodes(self, count: int, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(n.poll() is not None for n in self.nodes):
                break
            try:
                with urllib.request.urlopen(f"{self.address}/api/version", timeout=2):
                    pass
                if len(self.alive_nodes()) >= count:
                    return
            except (OSError, RuntimeError):
                pass
            time.sleep(1)
        logs = {p.name: (p / "start.log").read_text()[-1500:] for p in self.root.iterdir()}
        self.stop()
        raise RuntimeError(f"the cluster did not come up: {logs}")

    def head_node_id(self) -> str:
        return next(n["id"] for n in self.alive_nodes() if "node:__internal_head__" in n["resources"])

    def kill_raylet(self, worker: int) -> int:
        """SIGKILL the raylet of worker node `worker` (its node dies); returns its pid."""
        node = self.nodes[1 + worker]
        pid = next(p for p in _children(node.pid)
                   if "raylet" in Path(f"/proc/{p}/cmdline").read_text().split("\0")[0])
        os.kill(pid, signal.SIGKILL)
        return pid

    def submit(self, *entrypoint: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address",
                               self.address, "--", *entrypoint], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            try:
                os.killpg(node.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for node in self.nodes:
            try:
                node.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            try:  # the group's stragglers too: agents rename themselves, so their command line says nothing
                os.killpg(node.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            node.wait()
        out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
        for line in out.splitlines():
            pid, args = line.split(None, 1)
            if str(self.root) in args and "ps -eo" not in args:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(self.root, ignore_errors=True)
