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


RECEIVED = threading.Event()  # set by the handler: what a KeyboardInterrupt that is not a `Terminated` cannot say


def _terminate(signum, frame):
    RECEIVED.set()
    raise Terminated()


def stop_on_sigterm() -> None:
    """Turn SIGTERM into `Terminated` in the main thread (signals reach only it)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)


def by_sigterm(e: KeyboardInterrupt) -> bool:
    """Whether `e` is SIGTERM's. A signal handled while the driver waits inside Ray's C++ (`ray.wait`, `ray.get`)
    comes out as a plain KeyboardInterrupt: Ray's `check_signals` (_raylet.pyx) turns any KeyboardInterrupt a
    handler raises, `Terminated` included, into its own."""
    return isinstance(e, Terminated) or RECEIVED.is_set()
