"""Sample shards: Parquet files of PNG images, listed by a manifest (`manifest.py`), on any `pyarrow.fs`
filesystem.

Layout of an output URI (a local path, `file://`, `s3://`, `gs://`, ...)::

    _manifest.json                     the run's identity and, once complete, every shard's entry
    _shards/                           one record per shard finished since the manifest was last written
    _lease.json                        who is writing the set now (`lease.py`)
    data/train-00000-of-00049.parquet  one row per sample, ids [0, shard_size), row groups of 100
    data/train-00001-of-00049.parquet  ...

A shard is written to a hidden temporary name and renamed into place, then recorded, so a
shard is either complete and listed or absent. Names starting with '_' or '.' are skipped by
Parquet readers by convention, so any reader opens the directory itself
(`pyarrow.dataset.dataset(uri)`, `pandas.read_parquet`, Spark, DuckDB), and the shards' names are
those Hugging Face `datasets` looks for (`load_dataset(uri)`, `load_dataset("parquet", data_dir=uri)`:
an `image` column of PIL images, the Image feature in the schema metadata). The manifest stays the
record of what a run completed: the readers here (`open_dataset`, `iter_shards`, `read_images`)
go through it and verify checksums. Every data page also carries a CRC (Parquet page checksums),
so a shard can be verified on its own when the manifest is lost (`recover_entries`).

Columns: `sample_id` int64, `label` int32 (-1 unconditional), `seed` int64 (the run's
global seed; noise comes from (seed, sample_id)), `image` struct{bytes: PNG, path} (the
Hugging Face Image feature), and solver stats of the batch that produced the sample:
`block_passes` list<int32> (network passes per block, forward block order),
`fallbacks` int32, `residual` float32 (largest final Jacobi update).
"""
from __future__ import annotations

import hashlib
import io
import json
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from .files import join, read_bytes, resolve, write_atomic
from .manifest import DATA_DIR, MANIFEST_NAME, Manifest, ShardEntry, ShardError, check_entry, commit_shard, \
    identity_difference, read_manifest, write_manifest

__all__ = ["DATA_DIR", "MANIFEST_NAME", "Manifest", "SCHEMA", "ShardEntry", "ShardError", "check_entry",
           "commit_shard", "decode_png", "encode_png", "identity_difference", "iter_images", "iter_shards",
           "open_dataset", "read_images", "read_manifest", "read_metadata", "read_shard", "recover_entries",
           "require_complete", "shard_paths",
           "shard_table", "to_uint8", "verify_shards", "write_manifest", "write_shard"]
ROW_GROUP_ROWS = 100  # readers that stream (datasets, DuckDB) hold one row group, not a whole shard

METADATA_KEY = b"tarflow-gs"

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA = pa.schema([
    ("sample_id", pa.int64()),
    ("label", pa.int32()),
    ("seed", pa.int64()),
    ("image", IMAGE_TYPE),
    ("block_passes", pa.list_(pa.int32())),
    ("fallbacks", pa.int32()),
    ("residual", pa.float32()),
])
# lets Hugging Face `datasets` decode the image column as images, not raw structs
HF_FEATURES = {"info": {"features": {
    "sample_id": {"dtype": "int64", "_type": "Value"},
    "label": {"dtype": "int32", "_type": "Value"},
    "seed": {"dtype": "int64", "_type": "Value"},
    "image": {"_type": "Image"},
    "block_passes": {"feature": {"dtype": "int32", "_type": "Value"}, "_type": "Sequence"},
    "fallbacks": {"dtype": "int32", "_type": "Value"},
    "residual": {"dtype": "float32", "_type": "Value"},
}}}


# ---- images ------------------------------------------------------------------------------

def to_uint8(images) -> np.ndarray:
    """Model-space images (B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C), rounded as torchvision's save_image."""
    x = np.asarray(images, dtype=np.float32)
    return np.clip(np.floor(x * 127.5 + 128.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, C) with C in {1, 3} -> PNG bytes (lossless)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"encode_png takes uint8 (H, W, 1|3) arrays, got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 (H, W, C)."""
    with Image.open(io.BytesIO(data)) as img:
        array = np.asarray(img)
    return array[:, :, None] if array.ndim == 2 else array


# ---- shard files ---------------------------------------------------------------------------

def shard_table(sample_ids, labels, seed: int, pngs: list[bytes], block_passes, fallbacks, residual) -> pa.Table:
    n = len(sample_ids)
    image = pa.StructArray.from_arrays(
        [pa.array(pngs, pa.binary()), pa.array([f"{int(i):08d}.png" for i in sample_ids], pa.string())],
        fields=list(IMAGE_TYPE))
    return pa.Table.from_arrays([
        pa.array(np.asarray(sample_ids, np.int64)),
        pa.array(np.asarray(labels, np.int32)),
        pa.array(np.full(n, seed, np.int64)),
        image,
        pa.array([list(map(int, p)) for p in block_passes], pa.list_(pa.int32())),
        pa.array(np.asarray(fallbacks, np.int32)),
        pa.array(np.asarray(residual, np.float32)),
    ], schema=SCHEMA)


def write_shard(uri: str, layout: Manifest, index: int, table: pa.Table, metadata: dict, stats: dict | None = None,
                owner: str = "") -> ShardEntry:
    """Write shard `index` of `layout` atomically (temporary tagged `owner`); returns its entry (the checksum
    is of the file's bytes)."""
    fs, base = resolve(uri)
    meta = {METADATA_KEY: json.dumps(metadata, sort_keys=True).encode(),
            b"huggingface": json.dumps(HF_FEATURES).encode()}
    table = table.replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", write_page_checksum=True, row_group_size=ROW_GROUP_ROWS)
    data = sink.getvalue().to_pybytes()
    name = layout.shard_file(index)
    write_atomic(fs, join(base, name), data, owner)
    ids = table.column("sample_id")
    return ShardEntry(name, index, table.num_rows, int(ids[0].as_py()), int(ids[-1].as_py()),
                      hashlib.sha256(data).hexdigest(), len(data), stats or {})


def recover_entries(uri: str, identity: dict, layout: Manifest) -> list[ShardEntry]:
    """Entries for the shard files under `uri` that verify on their own, for when the manifest is lost:
    every page's CRC holds, the file's metadata names this run's identity (its device, if not yet
    known, becomes the run's) and its shard index, and it holds exactly that shard's ids. Files that
    fail any check are left out (and redone)."""
    fs, base = resolve(uri)
    entries = []
    files = fs.get_file_info(pafs.FileSelector(join(base, DATA_DIR), allow_not_found=True))
    for info in sorted(files, key=lambda i: i.base_name):
        name = f"{DATA_DIR}/{info.base_name}"
        if not (info.base_name.startswith("train-") and name.endswith(".parquet")):
            continue
        data = read_bytes(fs, info.path)
        try:
            table = pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
            meta = json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))
        except (pa.ArrowException, OSError, ValueError):
            continue
        index, settings = meta.get("shard"), meta.get("settings", {})
        if (not isinstance(settings, dict) or identity_difference(settings, identity) or not isinstance(index, int)
                or name != layout.shard_file(index)):
            continue
        ids = table.column("sample_id").to_numpy()
        if not np.array_equal(ids, np.asarray(layout.shard_ids(index))):
            continue
        identity["numerics"]["device"] = settings["numerics"]["device"]
        entries.append(ShardEntry(name, index, table.num_rows, int(ids[0]), int(ids[-1]),
                                  hashlib.sha256(data).hexdigest(), len(data), meta.get("stats", {})))
    return entries


# ---- readers -----------------------------------------------------------------------------

def _check_entry(uri: str, entry: ShardEntry, data: bytes | None, size: int | None) -> None:
    where = f"{uri}/{entry.file}"
    if size is not None and size != entry.size_bytes:
        raise ShardError(f"shard {where} has {size} bytes, the manifest says {entry.size_bytes}: it is corrupt "
                         "or was replaced (re-run generate to redo it)")
    if data is not None and hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ShardError(f"shard {where} fails its sha256 check: it is corrupt (re-run generate to redo it)")


def require_complete(uri: str, manifest: Manifest, allow_partial: bool = False) -> None:
    """Raise ShardError unless `manifest` lists every shard of its run (or `allow_partial`)."""
    if not allow_partial and not manifest.complete:
        raise ShardError(f"{uri} is incomplete: {len(manifest.shards)} of {manifest.num_shards} shards "
                         f"({manifest.rows} of {manifest.num_samples} samples); resume generate to finish it")


def shard_paths(uri: str, allow_partial: bool = False) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem and the paths of the manifest's shards, each checked to exist with the listed size."""
    manifest = read_manifest(uri)
    require_complete(uri, manifest, allow_partial)
    fs, base = resolve(uri)
    paths = [join(base, e.file) for e in manifest.shards]
    for entry, info in zip(manifest.shards, fs.get_file_info(paths)):
        if info.type != pafs.FileType.File:
            raise ShardError(f"shard {uri}/{entry.file} is listed in the manifest but missing")
        _check_entry(uri, entry, None, info.size)
    return fs, paths


def open_dataset(uri: str, allow_partial: bool = False) -> ds.Dataset:
    """A `pyarrow.dataset` over the manifest's shards (sizes checked; `verify_shards` checks contents)."""
    fs, paths = shard_paths(uri, allow_partial)
    return ds.dataset(paths, filesystem=fs, format="parquet", schema=SCHEMA)


def iter_shards(uri: str, columns: list[str] | None = None, allow_partial: bool = False,
                verify: bool = True) -> Iterator[pa.Table]:
    """Yield each shard as a table, one at a time (memory bounded by one shard), checksum-verified."""
    manifest = read_manifest(uri)
    require_complete(uri, manifest, allow_partial)
    fs, base = resolve(uri)
    for entry in manifest.shards:
        yield _read_shard(fs, base, uri, entry, columns, verify)


def read_shard(uri: str, entry: ShardEntry, columns: list[str] | None = None, verify: bool = True) -> pa.Table:
    """One listed shard as a table, after its size and (with `verify`) its sha256 check; rows checked too."""
    return _read_shard(*resolve(uri), uri, entry, columns, verify)


def _read_shard(fs: pafs.FileSystem, base: str, uri: str, entry: ShardEntry, columns: list[str] | None,
                verify: bool) -> pa.Table:
    try:
        data = read_bytes(fs, join(base, entry.file))
    except FileNotFoundError as e:
        raise ShardError(f"shard {uri}/{entry.file} is listed in the manifest but missing") from e
    _check_entry(uri, entry, data if verify else None, len(data))
    try:
        table = pq.read_table(pa.BufferReader(data), columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        raise ShardError(f"shard {uri}/{entry.file} is not readable Parquet ({e})") from e
    if table.num_rows != entry.rows:
        raise ShardError(f"shard {uri}/{entry.file} has {table.num_rows} rows, the manifest says {entry.rows}")
    return table


def verify_shards(uri: str, allow_partial: bool = False) -> Manifest:
    """Check every listed shard's checksum, row count and id range; every id exactly once."""
    manifest = read_manifest(uri)
    for entry, table in zip(manifest.shards, iter_shards(uri, ["sample_id"], allow_partial)):
        ids = table.column("sample_id").to_numpy()
        want = np.asarray(manifest.shard_ids(entry.index))
        if not np.array_equal(ids, want):
            raise ShardError(f"shard {uri}/{entry.file} holds ids {ids[:3].tolist()}..., expected "
                             f"{want[0]}..{want[-1]} in order")
    return manifest


def iter_images(uri: str, allow_partial: bool = False, verify: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per shard: (sample_ids int64 (B,), labels int32 (B,), images uint8 (B, H, W, C))."""
    for table in iter_shards(uri, ["sample_id", "label", "image"], allow_partial, verify):
        pngs = table.column("image").combine_chunks().field("bytes").to_pylist()
        images = np.stack([decode_png(b) for b in pngs]) if pngs else np.zeros((0, 0, 0, 0), np.uint8)
        yield table.column("sample_id").to_numpy(), table.column("label").to_numpy(), images


def read_images(uri: str, allow_partial: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every sample at once: (sample_ids, labels, uint8 images (N, H, W, C)); use `iter_images` for large sets."""
    parts = list(iter_images(uri, allow_partial))
    if not parts:
        raise ShardError(f"{uri} has no completed shards")
    return tuple(np.concatenate(p) for p in zip(*parts))


def read_metadata(uri: str, entry: ShardEntry) -> dict:
    """The `tarflow-gs` key of one shard's Parquet schema metadata (model/plan hashes, settings, versions)."""
    fs, base = resolve(uri)
    schema = pq.read_schema(join(base, entry.file), filesystem=fs)
    return json.loads((schema.metadata or {}).get(METADATA_KEY, b"{}"))
