"""Files under a local path or any URI `pyarrow.fs` knows (file://, s3://, gs://, ...): atomic writes
and a run's small files (`Store`)."""
from __future__ import annotations

import os
import uuid

import pyarrow as pa
import pyarrow.fs as pafs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a local path or any URI `pyarrow.fs` knows."""
    uri = str(uri)
    if "://" in uri:
        try:  # S3: small files in one PutObject, not a multipart upload (issue 21; i21a owns the full change)
            return pafs.FileSystem.from_uri(uri + ("&" if "?" in uri else "?") + "allow_delayed_open=true"
                                            if uri.startswith("s3://") else uri)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise ValueError(f"URI {uri!r} is not a filesystem pyarrow can open: {e}") from e
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def check_creatable(uri: str) -> None:
    """Raise OSError where a local output could not be created: a file in the way, or no write permission.
    Object stores have no directories to check; their first write tells."""
    fs, path = resolve(uri)
    if not isinstance(fs, pafs.LocalFileSystem):
        return
    p = path
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise NotADirectoryError(f"cannot create {uri}: {p} is a file")
    if not os.access(p, os.W_OK):
        raise PermissionError(f"cannot create {uri}: {p} is not writable")


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes, owner: str = "") -> None:
    """Write under a hidden temporary name in the same directory, then rename over `path`.

    The temporary's name carries `owner` (a run id), so a run removes only its own leftovers.
    On object stores the rename is a copy: the object still appears whole or not at all."""
    directory, name = path.rsplit("/", 1)
    tmp = join(directory, f".{name}.tmp-{owner}{'-' if owner else ''}{uuid.uuid4().hex[:12]}")
    fs.create_dir(directory, recursive=True)
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def remove_temporaries(fs: pafs.FileSystem, directory: str, owners: set[str] | None = None) -> int:
    """Delete temporary files left by writers that died before their rename (only those of `owners`,
    when given); returns how many."""
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
        self.fs.create_dir(self.base, recursive=True)

    def path(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def exists(self, name: str) -> bool:
        return exists(self.fs, join(self.base, name))

    def read_text(self, name: str) -> str:
        return read_bytes(self.fs, join(self.base, name)).decode()

    def write_text(self, name: str, text: str) -> None:
        write_atomic(self.fs, join(self.base, name), text.encode())

    def check_writable(self) -> None:
        """Raise OSError now if nothing can be written here (a read-only mount, a denied bucket)."""
        probe = join(self.base, f".probe-{uuid.uuid4().hex[:12]}")
        with self.fs.open_output_stream(probe) as f:
            f.write(b"")
        self.fs.delete_file(probe)
