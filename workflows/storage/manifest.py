"""The record of a shard set: what a run is (its identity) and which shards it completed.

    _manifest.json         the run's identity (settings), layout and provenance; when the run completes,
                           every shard's entry folded in
    _shards/00012.json     one small record per shard finished since, written atomically after its shard
    data/train-00012-of-00049.parquet   the shards, named as Hugging Face datasets names its files

Bookkeeping per finished shard is one small write whatever the run's size (not a rewrite of a
manifest that grows with every shard), so 10,000 shards cost the driver the same per shard as 10.
A shard file is renamed into place before its record is written: a listed shard is complete,
and a shard without a record is redone on resume (its file name is its index, so nothing is
duplicated). Resume and `verify` recompute every listed shard's sha256 (streaming).
"""
from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import asdict, dataclass, field

import pyarrow.fs as pafs

from .files import join, read_bytes, resolve, write_atomic

MANIFEST_NAME = "_manifest.json"
RECORDS_DIR = "_shards"
DATA_DIR = "data"
MANIFEST_FORMAT = "tarflow-gs-shards"
MANIFEST_VERSION = 3
HASH_CHUNK_BYTES = 8 << 20


class ShardError(ValueError):
    """A shard set that is missing, corrupt, or does not match what its manifest says."""


@dataclass
class ShardEntry:
    """One completed shard as the manifest lists it."""

    file: str
    index: int
    rows: int
    first_id: int
    last_id: int  # inclusive
    sha256: str
    size_bytes: int
    stats: dict = field(default_factory=dict)


@dataclass
class Manifest:
    """Identity of a generation run and its completed shards."""

    settings: dict
    num_samples: int
    shard_size: int
    shards: list[ShardEntry] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    @property
    def complete(self) -> bool:
        return sorted(e.index for e in self.shards) == list(range(self.num_shards))

    @property
    def rows(self) -> int:
        return sum(e.rows for e in self.shards)

    def shard_ids(self, index: int) -> range:
        return range(index * self.shard_size, min((index + 1) * self.shard_size, self.num_samples))

    def shard_file(self, index: int) -> str:
        """Where shard `index` lives: `data/train-00012-of-00049.parquet`, the layout `datasets` loads."""
        return f"{DATA_DIR}/train-{index:05d}-of-{self.num_shards:05d}.parquet"

    def add(self, entry: ShardEntry) -> None:
        """Insert or replace by index, keeping the list sorted: O(log n) to find the place."""
        at = bisect.bisect_left(self.shards, entry.index, key=lambda e: e.index)
        if at < len(self.shards) and self.shards[at].index == entry.index:
            self.shards[at] = entry
        else:
            self.shards.insert(at, entry)

    def to_json(self) -> str:
        d = asdict(self)
        d["complete"] = self.complete
        d["rows"] = self.rows
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST_NAME) -> "Manifest":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ShardError(f"{where} is corrupt (not valid JSON: {e})") from None
        if not isinstance(d, dict) or d.get("format") != MANIFEST_FORMAT:
            raise ShardError(f"{where} is not a tarflow-gs shard manifest (format != {MANIFEST_FORMAT!r})")
        if d.get("version") != MANIFEST_VERSION:
            raise ShardError(f"{where}: manifest version {d.get('version')!r}, this build reads {MANIFEST_VERSION}")
        try:
            d.pop("complete", None)
            d.pop("rows", None)
            d["shards"] = [ShardEntry(**e) for e in d["shards"]]
            return cls(**d)
        except (KeyError, TypeError) as e:
            raise ShardError(f"{where} is corrupt (malformed: {e})") from None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def identity_difference(old: dict, new: dict) -> str:
    """`spec.seed=11 there vs 12 now; ...` for every field where two run identities differ (a device
    not yet known on one side is no difference: it is recorded when the first worker starts)."""
    a, b = _flatten(old), _flatten(new)
    return "; ".join(f"{k}={a.get(k)!r} there vs {b.get(k)!r} now" for k in sorted(set(a) | set(b))
                     if a.get(k) != b.get(k) and not (k == "numerics.device" and None in (a.get(k), b.get(k))))


def _text(fs, path: str, where: str) -> str:
    try:
        return read_bytes(fs, path).decode()
    except UnicodeDecodeError as e:
        raise ShardError(f"{where} is corrupt (not UTF-8 text: {e})") from None


def read_manifest(uri: str) -> Manifest:
    """The manifest with every committed shard record merged in (records override folded entries)."""
    fs, base = resolve(uri)
    path = join(base, MANIFEST_NAME)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise ShardError(f"no {MANIFEST_NAME} under {uri}: not a generated shard set (or generation never started)")
    manifest = Manifest.from_json(_text(fs, path, f"{uri}/{MANIFEST_NAME}"), f"{uri}/{MANIFEST_NAME}")
    for entry in read_records(uri):
        manifest.add(entry)
    return manifest


def read_records(uri: str) -> list[ShardEntry]:
    """Committed shard records not yet folded into the manifest (a corrupt one is an error naming it)."""
    fs, base = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(join(base, RECORDS_DIR), allow_not_found=True))
    entries = []
    for info in sorted((i for i in infos if i.base_name.endswith(".json") and not i.base_name.startswith(".")),
                       key=lambda i: i.base_name):
        where = f"{uri}/{RECORDS_DIR}/{info.base_name}"
        try:
            entries.append(ShardEntry(**json.loads(_text(fs, info.path, where))))
        except (json.JSONDecodeError, TypeError) as e:
            raise ShardError(f"{where} is corrupt ({e}): delete it and resume generate to redo its shard") from None
    return entries


def write_manifest(uri: str, manifest: Manifest) -> None:
    """Write the manifest with its entries folded in, then drop the records it now holds."""
    fs, base = resolve(uri)
    write_atomic(fs, join(base, MANIFEST_NAME), manifest.to_json().encode())
    records = join(base, RECORDS_DIR)
    if fs.get_file_info(records).type == pafs.FileType.Directory:
        fs.delete_dir(records)


def commit_shard(uri: str, entry: ShardEntry) -> int:
    """Record one finished shard: one small file, the same cost for the first shard and the 10,000th.
    Returns the bytes written."""
    fs, base = resolve(uri)
    data = json.dumps(asdict(entry), sort_keys=True).encode()
    write_atomic(fs, join(base, f"{RECORDS_DIR}/{entry.index:05d}.json"), data)
    return len(data)


def file_sha256(fs: pafs.FileSystem, path: str) -> tuple[str, int]:
    """(sha256 hex, size) of a file, read in chunks: memory stays flat for any shard size."""
    h, size = hashlib.sha256(), 0
    with fs.open_input_stream(path) as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def check_entry(uri: str, entry: ShardEntry) -> str | None:
    """Why a listed shard does not hold what its entry says (missing, resized, checksum), or None."""
    fs, base = resolve(uri)
    path = join(base, entry.file)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        return "missing"
    if info.size != entry.size_bytes:
        return f"{info.size} bytes, the manifest says {entry.size_bytes}"
    digest, _ = file_sha256(fs, path)
    return None if digest == entry.sha256 else "fails its sha256 check"
