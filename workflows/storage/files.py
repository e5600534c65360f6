"""Files under a local path or a store URI: one layer for shards, manifests, the lease, FID results,
statistics, history and (through `tarflow.checkpoint`'s fsspec open) checkpoints.

A local path (or `file://`) is pyarrow's local filesystem. Any other URI (`s3://`, `gs://`, `hdfs://`,
...) is an fsspec filesystem (s3fs, gcsfs: the `s3` and `gcs` extras; the same clients Hugging Face
`datasets` reads the output with), handed to pyarrow as a `PyFileSystem` so Parquet readers and
writers take it as they take a local disk. One client per store means one credential path per
store: the AWS chain (environment, profile, the pod's role) for S3, Google's application default
credentials for GCS.

Every request to a remote store has a deadline (`TARFLOW_GS_STORE_TIMEOUT_S`, 60 s, for connecting
and for each answer, with a bounded number of tries) and an error names the store and what to check
(`StoreError`). The options go into fsspec's own configuration, so a checkpoint URI opened by
`tarflow` gets them too.

A write appears whole or not at all: on an object store one PUT (or a multipart upload completed
in one request) does that by itself; on a local disk a hidden temporary is renamed into place.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import uuid

import fsspec
import pyarrow.fs as pafs

from .. import versions

STORE_TIMEOUT_S = float(os.environ.get("TARFLOW_GS_STORE_TIMEOUT_S", "60"))
# per store: its fsspec options (deadlines, no listing cache: actors write what the driver lists), the
# extra that installs its client, and what a user checks when it does not answer
STORES = {
    "s3": ({"use_listings_cache": False,
            "config_kwargs": {"connect_timeout": STORE_TIMEOUT_S, "read_timeout": STORE_TIMEOUT_S,
                              "retries": {"max_attempts": 2, "mode": "standard"}}},
           "s3", "credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the pod's IAM role) "
                 "and the endpoint (AWS_ENDPOINT_URL, unset for AWS itself)"),
    "gs": ({"cache_timeout": 0, "requests_timeout": STORE_TIMEOUT_S},
           "gcs", "credentials (GOOGLE_APPLICATION_CREDENTIALS or the node's service account) and the endpoint "
                  "(STORAGE_EMULATOR_HOST, unset for Google Cloud itself)"),
}
STORES["gcs"] = STORES["gs"]
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")
for _protocol, (_options, _, _) in STORES.items():  # a user's own fsspec configuration wins
    fsspec.config.conf[_protocol] = {**_options, **fsspec.config.conf.get(_protocol, {})}


class StoreError(OSError):
    """A store that cannot be opened or did not answer: which one, and what to check."""


def store_of(uri: str) -> str:
    """`s3://bucket` of `s3://bucket/set/...`: what a message names."""
    scheme, _, rest = str(uri).partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def _hint(uri: str) -> str:
    store = STORES.get(str(uri).partition("://")[0])
    return store[2] if store else "that the store's client is installed and configured"


@contextlib.contextmanager
def translated(uri: str, what: str):
    """Errors of a remote store's client as StoreError naming the store; a missing file stays
    FileNotFoundError (and a refused create FileExistsError): callers decide on those."""
    try:
        yield
    except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, StoreError):
        raise
    except Exception as e:  # clients raise their own types (botocore's, aiohttp's, asyncio's timeouts)
        raise StoreError(f"{store_of(uri)} could not {what}: {_reason(e)}; check {_hint(uri)}") from e


def _reason(e: BaseException) -> str:
    if isinstance(e, TimeoutError) or "Timeout" in type(e).__name__:
        return f"no answer within the deadline ({STORE_TIMEOUT_S:g}s a try, TARFLOW_GS_STORE_TIMEOUT_S)"
    return f"{type(e).__name__}: {str(e)[:300]}"


@functools.cache
def _client_unmet(extra: str) -> tuple[str, ...]:
    """What the store's extra declares and this environment does not meet (checked once a process)."""
    return tuple(versions.unmet((extra,), base=False))


class _StoreHandler(pafs.FSSpecHandler):
    """pyarrow's view of an fsspec filesystem, with every call's error naming the store."""

    def __init__(self, fs, uri: str):
        super().__init__(fs)
        self.uri = uri


def _translating(name: str):
    call = getattr(pafs.FSSpecHandler, name)

    def method(self, *args):
        target = args[0] if args else ""
        target = ", ".join(map(str, target)) if isinstance(target, list) else getattr(target, "base_dir", target)
        with translated(self.uri, f"{name.replace('_', ' ')} {target}".strip()):
            return call(self, *args)

    method.__name__ = name
    return method


for _name in ("get_file_info", "get_file_info_selector", "create_dir", "delete_dir", "delete_dir_contents",
              "delete_file", "move", "copy_file", "open_input_stream", "open_input_file", "open_output_stream"):
    setattr(_StoreHandler, _name, _translating(_name))


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a local path or a store URI; a URI that cannot be opened is a StoreError."""
    uri = str(uri)
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    if uri.startswith("file://"):
        return pafs.LocalFileSystem(), uri.removeprefix("file://")
    scheme = uri.partition("://")[0]
    if scheme in STORES and not BUCKET_NAME.fullmatch(store_of(uri).partition("://")[2]):
        raise StoreError(f"{uri}: {store_of(uri).partition('://')[2]!r} is not a bucket name (a placeholder left "
                         "in a config?): give the bucket to write to")
    if scheme in STORES and (unmet := _client_unmet(STORES[scheme][1])):
        # before any call: a client below its floor fails deep in a request (s3fs 0.4 has no call_s3),
        # where the error would read like a credentials problem
        raise StoreError(f"{uri}: the {scheme}:// store cannot be opened: " + "; ".join(unmet))
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except ImportError as e:
        extra = STORES.get(scheme, (None, None))[1]
        raise StoreError(f"{uri}: {scheme}:// needs a client that is not installed ({e})"
                         + (f": pip install 'tarflow-gs[{extra}]'" if extra else "")) from None
    except ValueError as e:  # fsspec: an unknown protocol
        raise StoreError(f"{uri}: no filesystem for {scheme}:// ({e})") from None
    except Exception as e:  # a client that fails to start (hdfs without libhdfs, bad options)
        raise StoreError(f"{store_of(uri)} could not be opened: {_reason(e)}; check {_hint(uri)}") from None
    return pafs.PyFileSystem(_StoreHandler(fs, uri)), path.rstrip("/")


def client(fs: pafs.FileSystem):
    """The fsspec filesystem behind a remote store's pyarrow view (None for a local disk)."""
    handler = getattr(fs, "handler", None)
    return handler.fs if isinstance(handler, _StoreHandler) else None


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    # a remote read fails while streaming too, after the handler's open: name the store then as well
    with translated(fs.handler.uri, f"read {path}") if client(fs) else contextlib.nullcontext():
        with fs.open_input_stream(path) as f:
            return f.read()


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def check_creatable(uri: str) -> None:
    """Raise OSError where a local output could not be created: a file in the way, or no write permission.
    Object stores have no directories to check; their first write tells."""
    fs, path = resolve(uri)
    if not is_local(fs):
        return
    p = path
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise NotADirectoryError(f"cannot create {uri}: {p} is a file")
    if not os.access(p, os.W_OK):
        raise PermissionError(f"cannot create {uri}: {p} is not writable")


class LinkError(OSError):
    """A symbolic link inside an output, where the project would write, lock or delete through it."""


def below(fs: pafs.FileSystem, root: str, name: str) -> str:
    """The path of `name` (a folder or file; "" is `root`) under `root`, once no part of it below `root` is a
    symbolic link.

    Every path the project writes, replaces, locks or deletes under an output goes through here, so a
    link planted inside an output (`data` -> /etc) cannot carry a write out of it. `root` itself is
    what the user named and may be or sit under a link. Object stores have no links: a key is a name."""
    path = join(root, name) if name else root
    if is_local(fs) and name:
        part = root
        for step in name.split("/"):
            part = join(part, step)
            if os.path.islink(part):
                raise LinkError(f"{part} is a symbolic link (to {os.readlink(part)}): tarflow-gs writes only inside "
                                "its output, never through a link; remove the link")
    return path


def write_below(fs: pafs.FileSystem, root: str, name: str, data: bytes, owner: str = "") -> None:
    """Write `name` under `root` on any store, whole: readers see the old content or the new, never part of
    it, and no link below `root` leads the write out (`below`). `tarflow.atomic.write_atomic` is the same
    promise for a local path, for `tarflow`'s own files.

    An object store's PUT does that by itself: written directly (a rename there is a copy and a delete,
    two more requests for nothing). On a local disk: a hidden temporary in the same directory, renamed
    over the file (a link there is replaced, never written through); its name carries `owner` (a run
    id), so a run removes only its own leftovers."""
    folder, _, _ = name.rpartition("/")
    below(fs, root, folder)
    path = join(root, name)
    if not is_local(fs):  # the PUT happens when the stream closes: name the store for its errors too
        with translated(fs.handler.uri, f"write {path}"):
            with fs.open_output_stream(path) as f:
                f.write(data)
        return
    directory, base = path.rsplit("/", 1)
    tmp = join(directory, f".{base}.tmp-{owner}{'-' if owner else ''}{uuid.uuid4().hex[:12]}")
    fs.create_dir(directory, recursive=True)
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise


def remove_temporaries(fs: pafs.FileSystem, root: str, name: str = "", owners: set[str] | None = None) -> int:
    """Delete temporary files left by writers that died before their rename, in the folder `name` under
    `root` (only those of `owners`, when given); returns how many. Only a local disk has them: object
    stores are written directly."""
    if not is_local(fs):
        return 0
    directory = below(fs, root, name)
    infos = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    stale = [i.path for i in infos if i.type == pafs.FileType.File and i.base_name.startswith(".")
             and ".tmp-" in i.base_name
             and (owners is None or i.base_name.split(".tmp-", 1)[1].rsplit("-", 1)[0] in owners)]
    for path in stale:
        fs.delete_file(path)
    return len(stale)


class Store:
    """Small files of a run under its output URI: read, atomic write, existence."""

    def __init__(self, uri: str):
        self.uri = str(uri).rstrip("/")
        self.fs, self.base = resolve(self.uri)
        if is_local(self.fs):  # object stores have no directories (and fsspec's would create a bucket)
            self.fs.create_dir(self.base, recursive=True)

    def path(self, name: str) -> str:
        """The URI of `name` here, for a stage to write under: refused if a link below the root leads out."""
        below(self.fs, self.base, name)
        return f"{self.uri}/{name}"

    def exists(self, name: str) -> bool:
        return exists(self.fs, join(self.base, name))

    def read_text(self, name: str) -> str:
        return read_bytes(self.fs, join(self.base, name)).decode()

    def write_text(self, name: str, text: str) -> None:
        write_below(self.fs, self.base, name, text.encode())

    def check_writable(self) -> None:
        """Raise OSError now if nothing can be written here (a read-only mount, a denied bucket)."""
        probe = f".probe-{uuid.uuid4().hex[:12]}"
        write_below(self.fs, self.base, probe, b"")
        self.fs.delete_file(join(self.base, probe))

