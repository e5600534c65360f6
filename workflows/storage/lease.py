"""One writer per output: `_lease.json`, exclusive by construction on every store.

The lease names the run that writes a shard set (run id, host, pid). How a second writer is kept out
depends on what the store guarantees, never on timing:

- a local disk: the lease is opened without following links and its holder keeps an exclusive `flock`
  on it for the whole run. The kernel drops the lock when the holder's process ends however it ends,
  so a lock that can be taken means its holder is gone: the lease is taken over at once, with a warning.
- an object store (S3, GCS): the lease is created only if absent (S3 `If-None-Match: *`, GCS
  `ifGenerationMatch=0`) and renewed every `heartbeat_s` by compare-and-swap on the version that
  this run wrote (S3 `If-Match: <ETag>`, GCS `ifGenerationMatch=<generation>`). A lease is stale
  when its last write is older than `timeout_s` by the store's own clock (the object's modification
  time against the Date of the same answer: no host's clock is read), or at once when its holder
  ran on this host (same host name and boot) and its process is gone (a killed run resumed where it
  ran). It is taken over by a compare-and-swap on the version judged stale, so of two runs that both
  find it stale one wins.

A refused run is told who holds the output; the holder finds out at its next heartbeat that it lost
the lease (a swap refused) and stops writing. The conditional writes go through the store's own
client (s3fs's `call_s3` for S3, gcsfs's `call` for GCS), the same one every other byte goes through.

The file is a `LeaseRecord`. One that is not (a pid out of range, NaN, an unknown field) names no
holder: a refusal says what is wrong with it, and it is taken over only when it ages out (object
stores) or its lock is free (a local disk), never judged by its pid.
"""
from __future__ import annotations

import email.utils
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from urllib.parse import quote

from pydantic import NonNegativeFloat, PositiveInt, with_config
from typing_extensions import TypedDict

from tarflow.schema import STRICT_FIELDS, SchemaError, parse_json, validate

from .files import LinkError, client, is_local, join, resolve, store_of, translated

log = logging.getLogger(__name__)

LEASE_NAME = "_lease.json"


class LeaseError(RuntimeError):
    """The output is being written by another run, or this run lost its lease."""


@with_config(STRICT_FIELDS)
class Writer(TypedDict):
    """Who writes an output: a run, the host it runs on (and that host's boot), its process."""

    run_id: str
    host: str  # the machine's name (socket.gethostname()); the key older runs' leases and manifests hold
    boot: str | None  # None: a host that does not say
    pid: PositiveInt


@with_config(STRICT_FIELDS)
class LeaseRecord(Writer):
    """What `_lease.json` holds: its writer and the write's count and time."""

    beat: PositiveInt  # writes by this holder so far: every write differs, so a renewal changes the version
    written: NonNegativeFloat  # time.time() of the write, by the holder's clock: shown to people, never compared


@dataclass(frozen=True)
class Holder:
    """Whom `_lease.json` names, as read: its record, or None where the file names no one."""

    record: LeaseRecord | None
    unreadable: str = ""  # why the file names no one: "is empty", "is gone", "is not a lease this build reads (...)"

    def __str__(self) -> str:
        if self.record is None:
            return f"an unknown run ({LEASE_NAME} {self.unreadable})"
        return f"run {self.record['run_id']} on host {self.record['host']} (pid {self.record['pid']})"


GONE = Holder(None, "is gone")  # a lease removed while it was read


def _holder_of(data: bytes) -> Holder:
    if not data.strip():  # its holder has not written its name yet
        return Holder(None, "is empty")
    try:
        return Holder(validate(LeaseRecord, parse_json(data, "its text"), ""))
    except SchemaError as e:
        return Holder(None, f"is not a lease this build reads ({e})")


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _LocalLock:
    """The lease file on a local disk, held with an exclusive flock."""

    def __init__(self, path: str):
        self.path, self.fd = path, None

    def take(self, payload: bytes) -> tuple[bool, Holder | None]:
        """(won, the holder it replaced or refused); won with None: the file named no one."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            try:  # never through a link: one planted here would have this run truncate its target
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                if e.errno != errno.ELOOP:
                    raise
                raise LinkError(f"{self.path} is a symbolic link (to {os.readlink(self.path)}): tarflow-gs "
                                "writes only inside its output, never through a link; remove the link") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False, self._holder()
            if not self._names(fd):  # we locked a lease its holder released (unlinked) meanwhile: start over
                os.close(fd)
                continue
            previous = os.pread(fd, 1 << 16, 0)
            os.ftruncate(fd, 0)
            os.pwrite(fd, payload, 0)
            os.fsync(fd)
            self.fd = fd
            return True, _holder_of(previous) if previous else None

    def _names(self, fd: int) -> bool:
        """Whether the lease's path still leads to the file `fd` has open."""
        try:
            return os.lstat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _holder(self) -> Holder:
        # the winner writes its name right after it takes the lock: give it a moment
        for _ in range(50):
            try:
                with open(self.path, "rb") as f:
                    held = _holder_of(f.read())
            except FileNotFoundError:
                held = GONE
            if held.record is not None:
                return held
            time.sleep(0.02)
        return held

    def lost(self) -> str | None:
        if self._names(self.fd):
            return None
        return f"{self.path} was removed or replaced while this run held it"

    def release(self) -> None:
        if self.fd is None:
            return
        if self.lost() is None:
            os.unlink(self.path)  # while still locked: nobody can take a lease we are removing
        os.close(self.fd)
        self.fd = None


class _S3Object:
    """The lease as an S3 object, written with conditional PUTs through s3fs's client."""

    def __init__(self, fs, path: str, uri: str):
        self.fs, self.path, self.uri = fs, path, uri
        self.bucket, _, self.key = path.partition("/")

    def put(self, payload: bytes, version: str | None = None) -> str | None:
        """The new ETag, or None if the object's ETag was not `version` (None: if it existed)."""
        condition = {"IfMatch": version} if version else {"IfNoneMatch": "*"}
        with translated(self.uri, f"write {LEASE_NAME}"):
            try:
                return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=payload,
                                       **condition)["ETag"]
            except OSError as e:
                if _conflict(e):
                    return None
                raise

    def read(self) -> tuple[Holder, str, float] | None:
        """(holder, ETag, seconds since its last write by the store's clock), or None if there is none."""
        with translated(self.uri, f"read {LEASE_NAME}"):
            try:
                # the ETag before the text: a swap on that ETag succeeds only if the object is unchanged
                # since, so the text judged is the text swapped out
                head = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)
                data = self.fs.cat_file(self.path)
            except FileNotFoundError:
                return None
        now = email.utils.parsedate_to_datetime(head["ResponseMetadata"]["HTTPHeaders"]["date"])
        return _holder_of(data), head["ETag"], max(0.0, (now - head["LastModified"]).total_seconds())

    def delete(self, version: str) -> None:
        with translated(self.uri, f"remove {LEASE_NAME}"):
            try:
                if self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)["ETag"] == version:
                    self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)
            except FileNotFoundError:
                pass


def _conflict(e: OSError) -> bool:
    """S3's answer that a conditional write lost: 412 Precondition Failed, or 409 for a concurrent one.
    s3fs gives it as an OSError whose errno varies by release; botocore's answer is its cause."""
    response = getattr(e.__cause__, "response", None) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status in (409, 412) or response.get("Error", {}).get("Code") in ("PreconditionFailed",
                                                                              "ConditionalRequestConflict")


class _GCSObject:
    """The lease as a GCS object, written with generation preconditions through gcsfs's client."""

    def __init__(self, fs, path: str, uri: str):
        self.fs, self.uri = fs, uri
        self.bucket, _, self.key = path.partition("/")

    def put(self, payload: bytes, version: str | None = None) -> str | None:
        """The new generation, or None if the object's generation was not `version` (None: if it existed)."""
        # gcsfs writes with no precondition but "absent" (pipe_file's mode="create", 2024.12 to 2026.10); a
        # swap needs ifGenerationMatch=<generation>, so this upload goes through gcsfs's `call`, multipart as
        # gcsfs sends its own (fake-gcs-server ignores preconditions on a media upload), the body made by
        # aiohttp, gcsfs's HTTP client
        import aiohttp  # installed with gcsfs (the gcs extra); a local or S3 lease needs none of it

        body = aiohttp.MultipartWriter("related")
        body.append_json({"name": self.key})
        body.append(payload, {"Content-Type": "application/json"})
        upload = self.fs.base.replace("/storage/v1/", "/upload/storage/v1/")  # the JSON API's upload endpoint
        with translated(self.uri, f"write {LEASE_NAME}"):
            try:
                written = self.fs.call("POST", f"{upload}b/{quote(self.bucket)}/o", uploadType="multipart",
                                       ifGenerationMatch=version or "0", data=body, json_out=True)
            except FileExistsError:  # gcsfs's name for 412: the precondition failed
                return None
        return str(written["generation"])

    def read(self) -> tuple[Holder, str, float] | None:
        """(holder, generation, seconds since its last write by the store's clock), or None if there is none."""
        with translated(self.uri, f"read {LEASE_NAME}"):
            try:  # one answer: the text, its generation, its write time and the store's clock
                headers, data = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, alt="media")
            except FileNotFoundError:
                return None
        now, written = (email.utils.parsedate_to_datetime(headers[name]) for name in ("Date", "Last-Modified"))
        return _holder_of(data), headers["X-Goog-Generation"], max(0.0, (now - written).total_seconds())

    def delete(self, version: str) -> None:
        with translated(self.uri, f"remove {LEASE_NAME}"):
            try:
                self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=version)
            except (FileNotFoundError, FileExistsError):
                pass


class Lease:
    """The lease of output `uri` for this run: `acquire`, then `check` while writing, then `release`."""

    def __init__(self, uri: str, timeout_s: float = 300.0, heartbeat_s: float = 20.0):
        self.uri = uri
        fs, base = resolve(uri)
        path = join(base, LEASE_NAME)
        remote = client(fs)
        protocols = set(getattr(remote, "protocol", ()))
        if is_local(fs):
            self.store = None
            self.lock = _LocalLock(path)
        elif "s3" in protocols:
            self.store = _S3Object(remote, path, uri)
        elif "gs" in protocols:
            self.store = _GCSObject(remote, path, uri)
        else:
            raise LeaseError(f"output {uri}: {store_of(uri)} offers no create-if-absent write, so one writer "
                             "cannot be guaranteed there; write to a local disk, S3 or GCS")
        self.run_id = uuid.uuid4().hex[:12]
        self.timeout_s, self.heartbeat_s = timeout_s, heartbeat_s
        self.me = Writer(run_id=self.run_id, host=socket.gethostname(), boot=_boot_id(), pid=os.getpid())
        self.taken_over: list[str] = []  # run ids of dead holders this run replaced
        self.version: str | None = None  # the object version this run wrote last (object stores)
        self.lost: str | None = None
        self._beats = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _payload(self) -> bytes:
        # every write differs (a beat count), so a renewal changes the version a stale judgement saw
        self._beats += 1
        return json.dumps(LeaseRecord(**self.me, beat=self._beats, written=time.time())).encode()

    def acquire(self) -> "Lease":
        if self.store is None:
            won, held = self.lock.take(self._payload())
            if not won:
                raise LeaseError(self._refusal(held))
            if held is not None:
                self._took_over(held, "its process ended (its lock on the lease is gone)")
            return self
        for _ in range(3):  # each round ends in a win, a refusal, or a lease released meanwhile
            self.version = self.store.put(self._payload())
            if self.version is not None:
                break
            found = self.store.read()
            if found is None:
                continue
            held, version, age = found
            why = self._stale(held, age)
            if why is None:
                raise LeaseError(self._refusal(held, age))
            self.version = self.store.put(self._payload(), version)
            if self.version is not None:
                self._took_over(held, why)
                break
        else:
            found = self.store.read() or (GONE, None, 0.0)
            raise LeaseError(self._refusal(found[0], found[2]))
        self._thread = threading.Thread(target=self._beat, name="tarflow-gs-lease", daemon=True)
        self._thread.start()
        return self

    def _stale(self, held: Holder, age: float) -> str | None:
        """Why an object store's lease no longer holds (None: its holder may be alive; a lease that names no
        one ages like any other)."""
        if age > self.timeout_s:
            return f"its last heartbeat was {age:.0f}s ago by the store's clock (timeout {self.timeout_s:.0f}s)"
        record = held.record
        if record is None:
            return None
        here = record["host"] == self.me["host"] and record["boot"] == self.me["boot"] is not None
        if here and not _alive(record["pid"]):
            return f"its process {record['pid']} on this host is gone"
        return None

    def _took_over(self, held: Holder, why: str) -> None:
        log.warning("%s: taking over the lease of %s: %s", self.uri, held, why)
        if held.record is not None:
            self.taken_over.append(held.record["run_id"])

    def _refusal(self, held: Holder, age: float | None = None) -> str:
        if age is None:  # a local lock: held for as long as its process lives
            return (f"output {self.uri} is being written by {held}, which holds its lock on {LEASE_NAME}; wait "
                    "for it to finish or stop it")
        return (f"output {self.uri} is being written by {held}, last heartbeat {age:.0f}s ago; wait for it to "
                f"finish, or if that run is dead, retry after {self.timeout_s:.0f}s without a heartbeat (or delete "
                f"{LEASE_NAME})")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                version = self.store.put(self._payload(), self.version)
            except OSError as e:  # the store did not answer this once: the lease holds until timeout_s
                log.warning("%s: lease heartbeat failed (%s); retrying in %.0fs", self.uri, e, self.heartbeat_s)
                continue
            if version is None:
                found = self.store.read() or (GONE, None, 0.0)
                self.lost = f"{found[0]} took over the lease of {self.uri}"
                return
            self.version = version

    def check(self) -> None:
        """Raise LeaseError if this run no longer holds the output (it must stop writing)."""
        if self.store is None and self.lock.fd is not None:
            self.lost = self.lost or self.lock.lost()
        if self.lost:
            raise LeaseError(f"{self.lost}: this run stops; finished shards are kept")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.store is None:
            self.lock.release()
        elif self.version is not None and not self.lost:
            self.store.delete(self.version)
