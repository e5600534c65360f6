"""Ends a private local Ray when the driver that started it dies, however it dies.

`ray.init(address="local")` starts GCS, raylet, dashboard and agent processes under the driver.
If the driver is SIGKILLed, Ray's own fate-sharing leaves `ray::DashboardAgent` and
`ray::RuntimeEnvAgent` behind: they notice the raylet died, then block for good publishing that
to the dead GCS (seen on Ray 2.60: stuck in `publish_error_to_driver`). So `runtime.connect`
starts this watchdog, in its own session, with a pipe from the driver on its stdin. While the
driver lives it keeps a list of the driver's descendants (pid and start time); when the pipe
closes (the driver exited or was killed) it terminates those that are still the same processes.

    python -m workflows.reaper DRIVER_PID      (Linux: it reads /proc)
"""
from __future__ import annotations

import os
import select
import signal
import sys
import time

POLL_S = 1.0
GRACE_S = 3.0


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every process below `root`."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            parents[int(name)] = st
    found, frontier = {}, {root}
    while frontier:
        frontier = {pid for pid, (ppid, _) in parents.items() if ppid in frontier and pid not in found}
        found.update({pid: parents[pid][1] for pid in frontier})
    return found


def _signal(pids: dict[int, int], sig: int) -> dict[int, int]:
    """Send `sig` to those still the recorded processes; returns them."""
    alive = {}
    for pid, start in pids.items():
        st = _stat(pid)
        if st is not None and st[1] == start:
            try:
                os.kill(pid, sig)
                alive[pid] = start
            except ProcessLookupError:
                pass
    return alive


def watch(driver: int) -> None:
    known: dict[int, int] = {}
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], POLL_S)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break  # EOF: the driver is gone
        known.update(descendants(driver))
        known.pop(os.getpid(), None)  # the watchdog is the driver's child too
    alive = _signal(known, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = {pid: s for pid, s in alive.items() if (st := _stat(pid)) is not None and st[1] == s}
    _signal(alive, signal.SIGKILL)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
