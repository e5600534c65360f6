"""One writer per output: a lease file with its holder's identity and a heartbeat, on any `pyarrow.fs`.

`_lease.json` names the run that writes a shard set (run id, host, pid) and when it last said it
was alive. A second run is refused, naming the holder, while the heartbeat is fresh. A lease is
stale when its holder's process is gone (same host) or its heartbeat is older than the timeout
(any host: object stores have no locks, so time is the only signal there); a stale lease is taken
over with a warning. Object stores also have no create-if-absent: a writer writes its lease, waits
a moment, and reads it back; if another run's lease is there, the later writer won and this one
backs off. The holder checks at every heartbeat that the lease is still its own.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from .files import join, read_bytes, resolve, write_atomic

log = logging.getLogger(__name__)

LEASE_NAME = "_lease.json"


class LeaseError(RuntimeError):
    """The output is being written by another run, or this run lost its lease."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    def __init__(self, uri: str, timeout_s: float = 300.0, heartbeat_s: float = 20.0, settle_s: float = 0.5):
        self.uri = uri
        self.fs, base = resolve(uri)
        self.path = join(base, LEASE_NAME)
        self.run_id = uuid.uuid4().hex[:12]
        self.timeout_s, self.heartbeat_s, self.settle_s = timeout_s, heartbeat_s, settle_s
        self.me = {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid()}
        self.taken_over: list[str] = []  # run ids of stale holders this run replaced
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    def _read(self) -> dict | None:
        try:
            return json.loads(read_bytes(self.fs, self.path))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return {}  # a torn or foreign file: nobody's lease

    def _write(self) -> None:
        write_atomic(self.fs, self.path, json.dumps({**self.me, "heartbeat": time.time()}).encode(), self.run_id)

    def _stale(self, lease: dict) -> str | None:
        """Why `lease` no longer holds (None: its holder is alive)."""
        age = time.time() - float(lease.get("heartbeat", 0))
        if lease.get("host") == self.me["host"] and isinstance(lease.get("pid"), int) and not _alive(lease["pid"]):
            return f"its process {lease['pid']} on this host is gone"
        if age > self.timeout_s:
            return f"its last heartbeat was {age:.0f}s ago (timeout {self.timeout_s:.0f}s)"
        return None

    def acquire(self) -> "Lease":
        held = self._read()
        if held:
            why = self._stale(held)
            if why is None:
                raise LeaseError(self._refusal(held))
            log.warning("%s: taking over the lease of run %s (%s, pid %s): %s", self.uri, held.get("run_id"),
                        held.get("host"), held.get("pid"), why)
            self.taken_over.append(str(held.get("run_id")))
        self._write()
        time.sleep(self.settle_s)
        held = self._read() or {}
        if held.get("run_id") != self.run_id:
            raise LeaseError(self._refusal(held))
        self._thread = threading.Thread(target=self._beat, name="tarflow-gs-lease", daemon=True)
        self._thread.start()
        return self

    def _refusal(self, held: dict) -> str:
        age = time.time() - float(held.get("heartbeat", 0))
        return (f"output {self.uri} is being written by run {held.get('run_id')} on host {held.get('host')} "
                f"(pid {held.get('pid')}, heartbeat {age:.0f}s ago); wait for it to finish, or if that run is dead "
                f"on another host, retry after {self.timeout_s:.0f}s without a heartbeat (or delete {LEASE_NAME})")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            held = self._read() or {}
            if held.get("run_id") != self.run_id:
                self.lost = (f"run {held.get('run_id')} on host {held.get('host')} took over the lease of "
                             f"{self.uri}")
                return
            self._write()

    def check(self) -> None:
        """Raise LeaseError if another run took the output over (this run must stop writing)."""
        if self.lost:
            raise LeaseError(f"{self.lost}: this run stops; finished shards are kept")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        held = self._read()
        if held and held.get("run_id") == self.run_id:
            self.fs.delete_file(self.path)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
