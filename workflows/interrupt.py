"""SIGTERM, what Kubernetes, `ray job stop` and `kill` send, stops a command as Ctrl-C does: the running
stage unwinds (its lease released, its actors killed, every finished shard kept), Ray is shut down, and
the command says so in one line and exits 143 (128 + SIGTERM), as a process ended by the signal would."""
from __future__ import annotations

import signal
import threading

EXIT_STATUS = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived. A KeyboardInterrupt, so that it unwinds through the code Ctrl-C unwinds through and
    no `except Exception` swallows it."""


def _terminate(signum, frame):
    raise Terminated()


def stop_on_sigterm() -> None:
    """Turn SIGTERM into `Terminated` in the main thread (signals reach only it)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
