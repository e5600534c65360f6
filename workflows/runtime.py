"""Ray, in one place: how this process connects, what a worker asks for, how many torch threads it
uses, which device it samples on, and the pool that runs idempotent units of work on actors.

Every command, job and stage goes through here; nothing else calls `ray.init` or sizes resources.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Callable, Iterable, Iterator

import ray
import torch

from tarflow.profile import device_name

from . import interrupt
from .config.stages import Resources

log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    """Ray cannot run the work as asked: a wrong address, or resources no node can give."""


# ---- connecting ---------------------------------------------------------------------------------------------

def cluster_address() -> str | None:
    """The cluster this process joins: RAY_ADDRESS (`ray job submit` sets it for the job's driver); None: a
    private local Ray, whose disks go with this machine only."""
    return os.environ.get("RAY_ADDRESS") or None


# how long joining a cluster may take: a TCP answer from its address, then Ray's own handshake
CONNECT_TIMEOUT_S = float(os.environ.get("TARFLOW_GS_CONNECT_TIMEOUT_S", "60"))


def _unreachable(address: str, why: str) -> ClusterError:
    return ClusterError(
        f"cannot join the Ray cluster at RAY_ADDRESS={address}: {why}. Check that its head node is up (`ray status` "
        "there), that this is its GCS address (head-ip:6379 as `ray start --head` prints it, or `auto` on one of its "
        "nodes) and that the port is open from here; or unset RAY_ADDRESS to run on a private local Ray")


def check_reachable(address: str | None = None) -> None:
    """Raise ClusterError, within CONNECT_TIMEOUT_S, unless something accepts connections at the cluster address
    (default RAY_ADDRESS): Ray itself retries an address where nothing listens for about ten minutes. Cheap, and
    starts nothing: commands call it before they create any output."""
    address = address or cluster_address()
    if not address or address == "auto" or address.startswith(("http://", "https://")):
        return  # `auto` is resolved by Ray from this node's files; a dashboard address is refused by `connect`
    host, sep, port = address.partition("://")[2 if "://" in address else 0].rpartition(":")
    if not sep or not port.isdigit():
        return  # not host:port: Ray's own parser says what is wrong with it
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=min(10.0, CONNECT_TIMEOUT_S)).close()
    except OSError as e:
        raise _unreachable(address, f"nothing answers there ({e})") from None


class _Expired(BaseException):
    """The join's deadline passed (a BaseException: Ray's connect loop retries on any Exception)."""


@contextlib.contextmanager
def _deadline(seconds: float):
    """Raise _Expired in the main thread once `seconds` pass. None in other threads (signals reach only the main
    one), nor where a timer is already set (a caller's own deadline, pytest-timeout's): it is left to run."""
    if threading.current_thread() is not threading.main_thread() or signal.getitimer(signal.ITIMER_REAL)[0] > 0:
        yield
        return

    def expire(signum, frame):
        raise _Expired()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def connect(address: str | None = None) -> None:
    """Ray for this process, once. `address` (default: RAY_ADDRESS) `auto` or a GCS address
    (host:port, as `ray job submit` sets it for the job's driver) joins that cluster, `ray://` uses
    Ray Client; none starts a private local Ray for this process alone, never a stray cluster.
    A dashboard address (`http(s)://...:8265`, what `ray job submit --address` takes) is refused
    with the command to use instead: `ray.init` would hand it to Ray Client and fail. Joining ends
    within CONNECT_TIMEOUT_S (plus one of Ray's own tries, which cannot be interrupted) with a
    message naming the address, never a wait without one. From here on SIGTERM stops the process as
    Ctrl-C does (`interrupt`): Ray's own handler exits mid-work."""
    address = address or cluster_address()
    if address and address.startswith(("http://", "https://")):
        raise ClusterError(
            f"RAY_ADDRESS={address} is a dashboard address, for submitting jobs: run this through "
            f"`ray job submit --address {address} --working-dir . -- <command>` (the job then joins the cluster), "
            "or unset RAY_ADDRESS to run on a private local Ray")
    if ray.is_initialized():
        return
    try:
        if address:
            check_reachable(address)
            log.info("joining the Ray cluster at %s", address)
            with _deadline(CONNECT_TIMEOUT_S):
                ray.init(address=address, log_to_driver=True)
        else:
            log.info("starting a private local Ray (%d CPUs)", os.cpu_count() or 1)
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
            _start_reaper()
    except _Expired:
        raise _unreachable(address, f"it accepts connections but Ray did not answer within {CONNECT_TIMEOUT_S:g}s "
                                    "(TARFLOW_GS_CONNECT_TIMEOUT_S)") from None
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise ClusterError(f"cannot connect to Ray at {address or 'a new local instance'}: {e}") from None
    interrupt.stop_on_sigterm()  # after ray.init, which installs a handler of its own
    atexit.register(shutdown)  # after ray.init's own: atexit runs it first


def shutdown() -> None:
    """Disconnect from Ray (stopping a private one) with Ctrl-C and SIGTERM ignored: a Ctrl-C inside `ray.shutdown`
    (Ray's atexit handler, which waits) leaves Ray half stopped and prints a traceback. Once the process
    is ending, a second Ctrl-C has nothing left to interrupt."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ray.shutdown()


_reaper: subprocess.Popen | None = None


def _start_reaper() -> None:
    """A watchdog that ends this private Ray if the driver dies without shutting it down (`reaper.py`)."""
    global _reaper
    if _reaper is None and os.path.isdir("/proc"):
        # the pipe's write end stays with the driver: its death, by any signal, is the watchdog's EOF
        _reaper = subprocess.Popen([sys.executable, "-m", "workflows.reaper", str(os.getpid())],
                                   stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)


# ---- one worker ------------------------------------------------------------------------------------------------

def worker_threads(res: Resources) -> int:
    """Torch threads of one worker: its whole CPUs, at least one. Never derived from the worker count
    or the node size: threads change the reduction order, so on a CPU they are part of what decides
    a sample's pixels, and a run's images must not depend on how it was split."""
    return max(1, int(res.num_cpus)) if res.num_cpus is not None else 1


def worker_options(res: Resources) -> tuple[float, float, int]:
    """(num_cpus, num_gpus, torch threads) of one worker of a stage.

    With num_cpus unset a worker asks for less than its share of the cluster, (CPUs / (workers + 1))
    and at most one: a pool that claims every CPU deadlocks a small machine as soon as anything else
    (a pipeline task, a Ray Data read) needs one (ray#44687)."""
    if res.num_cpus is not None:
        return res.num_cpus, res.num_gpus, worker_threads(res)
    total = ray.cluster_resources().get("CPU", 0.0)
    if total <= 0:
        raise ClusterError("the Ray cluster has no CPUs for the workers")
    cpus = max(math.floor(min(1.0, total / (res.actors + 1)) * 1000) / 1000, 0.001)
    return cpus, res.num_gpus, worker_threads(res)


def worker_device() -> torch.device:
    """The device of this worker: CUDA when Ray gave it a GPU and torch sees one, else the CPU."""
    if ray.is_initialized() and ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def placement(device: torch.device | str | None = None) -> dict:
    """Where this process runs: what `run.json` records for each stage's work."""
    ctx = ray.get_runtime_context() if ray.is_initialized() else None
    device = torch.device(device or worker_device())
    return {"node_id": ctx.get_node_id() if ctx else None, "hostname": socket.gethostname(), "pid": os.getpid(),
            "device": str(device), "accelerator": device_name(device, torch.get_num_threads()),
            "gpus": [str(g) for g in ray.get_gpu_ids()] if ctx else [], "torch_threads": torch.get_num_threads()}


def remote(fn: Callable, res: Resources, num_returns: int = 1):
    """`fn` as a Ray task with the stage's resources (each call sets its torch threads first).
    Tasks are retried if their worker dies: stage work is idempotent."""
    num_cpus, num_gpus, threads = worker_options(res)

    def task(*args, **kwargs):
        torch.set_num_threads(threads)
        return fn(*args, **kwargs)

    task.__name__, task.__qualname__ = fn.__name__, fn.__qualname__
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, num_returns=num_returns, max_retries=2)(task)


def get(refs):
    """`ray.get`, raising a task's own exception as itself rather than Ray's wrapper."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        raise e.cause from None


def _placed(fn: Callable, *args, **kwargs):
    return fn(*args, **kwargs), placement()


def run_task(fn: Callable, *args, res: Resources, **kwargs) -> tuple[object, dict]:
    """One call of `fn` in a Ray task with the stage's resources: (result, its `placement`). `fn` picks
    its device with `worker_device()`."""
    return get(remote(_placed, res).remote(fn, *args, **kwargs))


# ---- a pool of actors --------------------------------------------------------------------------------------------

class Worker:
    """Base of pool actors. Subclasses build what they hold once (a model, an extractor) on
    `self.device`; a unit names one of their methods itself (`ShardWorker.write_shard`)."""

    def __init__(self, threads: int):
        torch.set_num_threads(threads)
        self.device = worker_device()

    def ready(self) -> dict:
        return placement(self.device)


class WorkerStartError(ClusterError):
    """A pool's worker could not start: its constructor raised (bad weights, a missing file)."""


class _PoolActor:
    """The actor a pool runs: it builds its one `Worker` in `ready`, from arguments the pool passes to every
    (re)started actor, so that:
    - a worker's constructor error is `ready`'s answer and ends the pool with it. A constructor that raises
      inside a Ray actor's own constructor kills the actor and every later call fails at once, so a pool that
      retried would spin (its driver's Ray log grew by GBs a minute);
    - the worker's arguments are no actor constructor arguments: Ray keeps constructor arguments that sit in
      the object store (any large one) only as long as their first use, so a restarted actor could not
      find them (ray#53727). As arguments of `ready`, references among them are resolved by Ray at every
      call, and the pool holds them for its life."""

    def __init__(self, cls: type, threads: int):
        self.cls, self.threads, self.worker = cls, threads, None

    def ready(self, *args) -> dict:
        if self.worker is None:
            self.worker = self.cls(*args, self.threads)
        return self.worker.ready()

    def call(self, method: Callable, *args):
        """The result of one unit: `method` (a method of the worker's class) on the worker."""
        if self.worker is None:
            raise _Restarted(f"{self.cls.__name__} was restarted by Ray since its `ready`: it holds no worker")
        return method(self.worker, *args)


class _Restarted(RuntimeError):
    """A unit reached an actor that died while idle and that Ray restarted before the pool heard of it: the
    pool counts it as a death, starts the worker again (`ready`) and gives the unit to the next free one."""


class ActorPool:
    """Actors of one `Worker` class running idempotent units, on whatever the cluster can place.

    Units go only to actors that have answered `ready`, so a pool starts with the actors the
    cluster can place and grows as nodes join (an autoscaler adds them); it fails only if no
    actor is ready within `start_timeout_s`, naming the resources it asked for. An actor that dies
    (killed, out of memory, its node gone) is restarted by Ray (`max_restarts`); its unit goes back
    to the queue for whichever actor is ready first, rather than waiting on the restart, which may
    never be placed once a node is gone. A unit that loses its actor `max_attempts` times stops the
    pool. `replacements` counts the deaths.

    A worker whose constructor raises ends the pool at once with that error (`WorkerStartError`); one
    that dies while starting `max_attempts` times in a row (its process killed each time) ends it too.
    `args` reach every worker as it starts or restarts (`_PoolActor`)."""

    def __init__(self, cls: type, args: tuple, res: Resources, label: str, start_timeout_s: float = 300.0,
                 max_attempts: int = 3, num_actors: int | None = None):
        num_cpus, num_gpus, threads = worker_options(res)
        self.label, self.start_timeout_s, self.max_attempts = label, start_timeout_s, max_attempts
        self.asked = f"{num_cpus:g} CPU + {num_gpus:g} GPU per worker"
        actor = type(cls.__name__, (_PoolActor,), {})  # Ray titles actor processes ray::<class>: the worker's name
        remote = ray.remote(actor).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=-1, max_task_retries=0)
        self.args = args
        self.actors = [remote.remote(cls, threads) for _ in range(num_actors or res.actors)]
        self._ready = {a.ready.remote(*args): slot for slot, a in enumerate(self.actors)}
        self._start_deaths = [0] * len(self.actors)  # deaths while starting, in a row, per slot
        self._idle: list[int] = []  # slots of started actors with no unit
        self.placements: list[dict] = []
        self.replacements = 0

    def __enter__(self) -> "ActorPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)

    def _take_ready(self, timeout: float) -> list[int]:
        """Slots of the actors that answered `ready` within `timeout` seconds."""
        if not self._ready:
            return []
        done, _ = ray.wait(list(self._ready), num_returns=len(self._ready), timeout=timeout)
        slots = []
        for ref in done:
            slot = self._ready.pop(ref)
            try:
                self.placements.append(ray.get(ref))
            except ray.exceptions.RayTaskError as e:
                raise WorkerStartError(f"{self.label} worker could not start: {type(e.cause).__name__}: "
                                       f"{e.cause}") from e.cause
            except ray.exceptions.RayActorError as e:
                self._start_deaths[slot] += 1
                if e.actor_init_failed or self._start_deaths[slot] >= self.max_attempts:
                    raise WorkerStartError(f"{self.label} worker died {self._start_deaths[slot]} time(s) while "
                                           f"starting: {' '.join(str(e).split())[:500]}") from None
                self._ready[self.actors[slot].ready.remote(*self.args)] = slot  # died while starting: Ray restarts it
                continue
            self._start_deaths[slot] = 0
            slots.append(slot)
        return slots

    def _wait_for_one(self, since: float) -> None:
        """Block until an actor is ready, or raise once none has been for `start_timeout_s`."""
        while not self._idle:
            left = since + self.start_timeout_s - time.monotonic()
            if left <= 0:
                raise ClusterError(f"no {self.label} worker running for {self.start_timeout_s:.0f}s: the cluster "
                                   f"cannot place {self.asked} (lower the stage's num_cpus / num_gpus, or add nodes)")
            self._idle += self._take_ready(min(1.0, left))

    def start(self) -> dict:
        """Wait until at least one worker runs (at most `start_timeout_s`); returns the first one's placement."""
        self._idle += self._take_ready(0)
        self._wait_for_one(time.monotonic())
        return self.placements[0]

    def map_unordered(self, units: Iterable[tuple[Callable, tuple]]) -> Iterator[tuple[int, object]]:
        """(index, result) of each unit (a method of the worker class, its args) as it finishes, in no set
        order."""
        queue = deque(enumerate(units))
        if queue:
            self.start()
        free, running, attempts = self._idle, {}, {}
        idle_since = time.monotonic()
        while queue or running:
            free += self._take_ready(0)  # actors placed since: nodes joined, restarts done
            while queue and free:
                slot = free.pop()
                i, (method, args) = queue.popleft()
                running[self.actors[slot].call.remote(method, *args)] = (slot, i, method, args)
            if not running:  # units wait, no actor is up: the first to come back takes them
                self._wait_for_one(idle_since)
                continue
            [ref], _ = ray.wait(list(running), num_returns=1)
            slot, i, method, args = running.pop(ref)
            try:
                result = get(ref)
            except (ray.exceptions.RayActorError, _Restarted) as e:
                attempts[i] = attempts.get(i, 0) + 1
                if attempts[i] >= self.max_attempts:
                    raise ClusterError(f"{self.label}: unit {i} lost its worker {attempts[i]} times (last: "
                                       f"{type(e).__name__}); finished units are kept") from None
                log.warning("%s: a worker died on unit %d (%s); the unit goes to the next free worker",
                            self.label, i, type(e).__name__)
                self.replacements += 1
                queue.appendleft((i, (method, args)))
                self._ready[self.actors[slot].ready.remote(*self.args)] = slot  # back in the pool once Ray restarted it
                idle_since = time.monotonic()
                continue
            free.append(slot)
            idle_since = time.monotonic()
            yield i, result
