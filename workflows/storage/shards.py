"""Sample shards: Parquet files of PNG images and the manifest that records them, on a local disk or
any store `files.resolve` opens.

Layout of an output URI (a local path, `file://`, `s3://`, `gs://`, ...)::

    _manifest.json                     the run's identity and, once complete, every shard's entry
    _shards/                           one record per shard finished since the manifest was last written
    _lease.json                        who is writing the set now (`lease.py`)
    data/train-00000-of-00049.parquet  one row per sample, ids [0, shard_size), row groups of 100
    data/train-00001-of-00049.parquet  ...

A shard is written whole (`files.write_below`: one PUT on an object store, a temporary renamed into
place on a local disk), then recorded, so a shard is either complete and listed or absent.
Bookkeeping per finished shard is one small record whatever the run's size (not a rewrite of a
manifest that grows with every shard), so 10,000 shards cost the driver the same per shard as 10;
a shard without a record is redone on resume (its file name is its index, so nothing is
duplicated). What made the set (`settings`: for `tarflow-gs generate`, the run's identity) is in the
manifest and in every shard's metadata. Names starting with '_' or '.' are skipped by
Parquet readers by convention, so any reader opens the directory itself
(`pyarrow.dataset.dataset(uri)`, `pandas.read_parquet`, Spark, DuckDB), and the shards' names are
those Hugging Face `datasets` looks for (`load_dataset(uri)`, `load_dataset("parquet", data_dir=uri)`:
an `image` column of PIL images, the Image feature in the schema metadata). The manifest stays the
record of what a run completed: the readers here (`open_dataset`, `iter_shards`, `read_images`)
go through it and verify checksums. Every data page also carries a CRC (Parquet page checksums),
so a shard can be verified on its own when the manifest is lost (`recover_entries`). A shard's
columns are `SCHEMA`.
"""
from __future__ import annotations

import bisect
import dataclasses
import hashlib
import io
import json
from dataclasses import asdict, field
from typing import Annotated, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveInt, ValidationError, with_config
from pydantic.dataclasses import dataclass
from typing_extensions import TypedDict

from tarflow.schema import STRICT_FIELDS, SchemaError, parse_json, validate

from .files import below, join, read_bytes, resolve, write_below
from .lease import Writer

MANIFEST_NAME = "_manifest.json"
RECORDS_DIR = "_shards"
DATA_DIR = "data"
MANIFEST_FORMAT = "tarflow-gs-shards"
MANIFEST_VERSION = 3
HASH_CHUNK_BYTES = 8 << 20
ROW_GROUP_ROWS = 100  # readers that stream (datasets, DuckDB) hold one row group, not a whole shard
METADATA_KEY = b"tarflow-gs"
# what one set can hold, checked before anything is created or listed: the driver keeps a list of pending
# shards and the manifest one entry per shard (about 300 bytes: 30 MB at the bound); an actor holds one
# shard's encoded images while it writes it (65,536 at 256 px is about 10 GB)
MAX_SHARDS = 100_000
MAX_SHARD_SIZE = 65_536


def layout_problem(num_samples: int, shard_size: int) -> SchemaError | None:
    """Why a set of `num_samples` in shards of `shard_size` exceeds the bounds above (at the field to change),
    or None."""
    if shard_size > MAX_SHARD_SIZE:
        return SchemaError(f"at most {MAX_SHARD_SIZE} samples per shard", "shard_size", shard_size)
    shards = -(-num_samples // shard_size)
    if shards > MAX_SHARDS:
        return SchemaError(f"{shards} shards of {shard_size}; a set holds at most {MAX_SHARDS} shards: raise "
                           f"shard_size (up to {MAX_SHARD_SIZE}) or make fewer samples", "num_samples", num_samples)
    return None


# ---- the manifest ----------------------------------------------------------------------------


class ShardError(ValueError):
    """A shard set that is missing, corrupt, or does not match what its manifest says."""


def _parsed(tp, data, where: str):
    """`data` (parsed JSON) as `tp`, or a ShardError naming the file `where` and each bad field by its path."""
    try:
        return validate(tp, data, "", ShardError)
    except ShardError as e:
        raise ShardError(f"{where} is corrupt ({e})") from None


@with_config(STRICT_FIELDS)
class ShardStats(TypedDict, total=False):
    """What made one shard, as its worker measured it (a plain dict in memory; any key may be absent)."""

    batches: PositiveInt
    block_passes: list[NonNegativeInt]  # network passes per block over the shard's batches, forward block order
    fallbacks: NonNegativeInt
    device: str
    seconds: NonNegativeFloat  # sampling, encoding and the write


@dataclass(config=STRICT_FIELDS)
class ShardEntry:
    """One completed shard as the manifest lists it."""

    file: str
    index: NonNegativeInt
    rows: PositiveInt
    first_id: NonNegativeInt
    last_id: NonNegativeInt  # inclusive
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    size_bytes: PositiveInt
    stats: ShardStats = field(default_factory=dict)

    def __post_init__(self):
        if self.last_id - self.first_id + 1 != self.rows:
            raise SchemaError(f"ids {self.first_id}..{self.last_id} are {self.last_id - self.first_id + 1}", "rows",
                              self.rows)


@with_config(STRICT_FIELDS)
class Provenance(TypedDict, total=False):
    """What made a generated set, for people: never compared (`settings` is what a resume must match)."""

    checkpoint: str
    plan: dict  # the plan's JSON form as it was (`Plan.to_dict`): not read back, so a later plan format reads it
    software: dict[str, str | None]  # package versions (None: not installed)
    writer: Writer  # the run that holds, or last held, the output's lease


@dataclass(config=STRICT_FIELDS)
class Manifest:
    """What made a set and its completed shards. Read back through this model (and records through
    `ShardEntry`, checked against the layout): every number in range, every listed file and id range
    the layout's own, no unknown fields; the JSON form is what `to_json` has always written."""

    settings: dict  # what made the set, compared on resume (for `tarflow-gs generate`: the run's identity)
    num_samples: PositiveInt
    shard_size: PositiveInt
    shards: list[ShardEntry] = field(default_factory=list)  # by index, each once
    provenance: Provenance = field(default_factory=dict)
    format: Literal[MANIFEST_FORMAT] = MANIFEST_FORMAT
    version: Literal[MANIFEST_VERSION] = MANIFEST_VERSION

    def __post_init__(self):
        if (problem := layout_problem(self.num_samples, self.shard_size)) is not None:
            raise problem
        for key in ("num_samples", "shard_size"):
            if key in self.settings and self.settings[key] != getattr(self, key):
                raise ValueError(f"{key}={getattr(self, key)}: its settings say {self.settings[key]!r}")
        for i, entry in enumerate(self.shards):
            problem = self.misfit(entry)
            if problem is None and i and entry.index <= self.shards[i - 1].index:
                problem = f"index={entry.index}: the shards are listed by index, each once"
            if problem:
                raise ValueError(f"shards[{i}].{problem}")

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

    def shard(self, index: int) -> Shard:
        """Shard `index` as this set's layout cuts it."""
        return Shard(index, self.shard_file(index), self.shard_ids(index))

    def misfit(self, entry: ShardEntry) -> str | None:
        """Why `entry` is not shard `entry.index` as this set's layout cuts it (`field=value: why`), or None:
        a listed file outside the layout (`../x`) is never read."""
        if entry.index >= self.num_shards:
            return f"index={entry.index}: the set has shards 0..{self.num_shards - 1}"
        shard = self.shard(entry.index)
        if entry.file != shard.file:
            return f"file={entry.file!r}: shard {entry.index} is {shard.file}"
        ids = shard.sample_ids
        if entry.first_id != ids.start:
            return f"first_id={entry.first_id}: shard {entry.index} starts at id {ids.start}"
        if entry.last_id != ids.stop - 1:
            return f"last_id={entry.last_id}: shard {entry.index} ends at id {ids.stop - 1}"
        return None

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
            d = parse_json(text, "the text", ShardError)
        except ShardError as e:
            raise ShardError(f"{where} is corrupt ({e})") from None
        if not isinstance(d, dict) or d.get("format") != MANIFEST_FORMAT:
            raise ShardError(f"{where} is not a tarflow-gs shard manifest (format != {MANIFEST_FORMAT!r})")
        if d.get("version") != MANIFEST_VERSION:
            raise ShardError(f"{where}: manifest version {d.get('version')!r}, this build reads {MANIFEST_VERSION}")
        derived = {k: d.pop(k) for k in ("complete", "rows") if k in d}  # written for people; must agree
        manifest = _parsed(cls, d, where)
        for k, said in derived.items():
            if type(said) is not type(getattr(manifest, k)) or said != getattr(manifest, k):
                raise ShardError(f"{where} is corrupt ({k}={said!r}: its shards say {getattr(manifest, k)!r})")
        return manifest


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
    for entry in read_records(uri, manifest):
        manifest.add(entry)
    return manifest


def read_records(uri: str, manifest: Manifest) -> list[ShardEntry]:
    """Committed shard records not yet folded into `manifest`, each checked to be one of its shards (a
    corrupt one is an error naming it)."""
    fs, base = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(join(base, RECORDS_DIR), allow_not_found=True))
    entries = []
    for info in sorted((i for i in infos if i.base_name.endswith(".json") and not i.base_name.startswith(".")),
                       key=lambda i: i.base_name):
        where = f"{uri}/{RECORDS_DIR}/{info.base_name}"
        text = _text(fs, info.path, where)
        try:
            entry = validate(ShardEntry, parse_json(text, "the text", ShardError), "", ShardError)
            problem = manifest.misfit(entry)
        except ShardError as e:
            problem = str(e)
        if problem:
            raise ShardError(f"{where} is corrupt ({problem}): delete it and resume generate to redo its shard")
        entries.append(entry)
    return entries


def write_manifest(uri: str, manifest: Manifest) -> None:
    """Write the manifest with its entries folded in, then drop the records it now holds."""
    fs, base = resolve(uri)
    write_below(fs, base, MANIFEST_NAME, manifest.to_json().encode())
    records = below(fs, base, RECORDS_DIR)
    if fs.get_file_info(records).type == pafs.FileType.Directory:
        fs.delete_dir(records)


def commit_shard(uri: str, entry: ShardEntry) -> int:
    """Record one finished shard: one small file, the same cost for the first shard and the 10,000th.
    Returns the bytes written."""
    fs, base = resolve(uri)
    data = json.dumps(asdict(entry), sort_keys=True).encode()
    write_below(fs, base, f"{RECORDS_DIR}/{entry.index:05d}.json", data)
    return len(data)


def file_sha256(fs: pafs.FileSystem, path: str) -> tuple[str, int]:
    """(sha256 hex, size) of a file, read in chunks: memory stays flat for any shard size."""
    h, size = hashlib.sha256(), 0
    with fs.open_input_stream(path) as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def entry_problem(entry: ShardEntry, size: int | None, sha256: str | None = None) -> str | None:
    """Why a listed shard's file (of `size` bytes, None: absent; `sha256` when computed) does not hold
    what its entry says, or None: the one integrity check, for resume, readers and `verify_shards`."""
    if size is None:
        return "is listed in the manifest but missing"
    if size != entry.size_bytes:
        return f"has {size} bytes, the manifest says {entry.size_bytes}"
    if sha256 is not None and sha256 != entry.sha256:
        return "fails its sha256 check"
    return None


def require_entry(uri: str, entry: ShardEntry, size: int | None, sha256: str | None = None) -> None:
    """`entry_problem` as a ShardError that says what to do."""
    problem = entry_problem(entry, size, sha256)
    if problem:
        raise ShardError(f"shard {uri}/{entry.file} {problem}: it is corrupt or was replaced (re-run generate to "
                         "redo it)")


def check_entry(uri: str, entry: ShardEntry) -> str | None:
    """`entry_problem` of a listed shard as it is now: its size, then (streaming) its sha256."""
    fs, base = resolve(uri)
    path = join(base, entry.file)
    info = fs.get_file_info(path)
    size = info.size if info.type == pafs.FileType.File else None
    return entry_problem(entry, size) or entry_problem(entry, size, file_sha256(fs, path)[0])



# ---- shard files ---------------------------------------------------------------------------

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # the Hugging Face Image feature
SCHEMA = pa.schema([  # a shard's columns, the one definition: `shard_table` fills them, HF_FEATURES follows them
    ("sample_id", pa.int64()),
    ("label", pa.int32()),  # -1: unconditional
    ("seed", pa.int64()),  # the run's global seed: noise comes from (seed, sample_id)
    ("image", IMAGE_TYPE),  # PNG bytes and a file name
    # solver stats of the batch that made the sample
    ("block_passes", pa.list_(pa.int32())),  # network passes per block, forward block order
    ("fallbacks", pa.int32()),
    ("residual", pa.float32()),  # largest final Jacobi update
])


def _hf_feature(tp: pa.DataType) -> dict:
    if tp == IMAGE_TYPE:
        return {"_type": "Image"}
    if pa.types.is_list(tp):
        return {"feature": _hf_feature(tp.value_type), "_type": "Sequence"}
    return {"dtype": np.dtype(tp.to_pandas_dtype()).name, "_type": "Value"}


# lets Hugging Face `datasets` decode the image column as images, not raw structs
HF_FEATURES = {"info": {"features": {f.name: _hf_feature(f.type) for f in SCHEMA}}}


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


def shard_table(sample_ids, labels, seed: int, pngs: list[bytes], block_passes, fallbacks, residual) -> pa.Table:
    """One shard's rows (`SCHEMA`): per sample its id, label, PNG and the stats of the batch that made it."""
    ids = np.asarray(sample_ids, np.int64)
    image = {"bytes": pngs, "path": [f"{i:08d}.png" for i in ids.tolist()]}
    columns = {"sample_id": ids, "label": labels, "seed": np.full(len(ids), seed), "image": image,
               "block_passes": block_passes, "fallbacks": fallbacks, "residual": residual}
    return pa.Table.from_arrays([_column(columns[f.name], f.type) for f in SCHEMA], schema=SCHEMA)


def _column(values, tp: pa.DataType) -> pa.Array:
    if pa.types.is_struct(tp):
        return pa.StructArray.from_arrays([pa.array(values[f.name], f.type) for f in tp], fields=list(tp))
    if pa.types.is_list(tp):
        return pa.array([list(map(int, v)) for v in values], tp)
    return pa.array(np.asarray(values, tp.to_pandas_dtype()))


@dataclasses.dataclass(frozen=True)
class Shard:
    """One shard of a set, as a task names it: its index, its file and the sample ids it holds, in order."""

    index: int
    file: str
    sample_ids: range

    def write(self, uri: str, table: pa.Table, metadata: dict, stats: dict | None = None,
              owner: str = "") -> ShardEntry:
        """Write `table` (`shard_table`) as this shard, atomically (temporary tagged `owner`); returns its entry
        (the checksum is of the file's bytes)."""
        fs, base = resolve(uri)
        meta = {METADATA_KEY: json.dumps(metadata, sort_keys=True).encode(),
                b"huggingface": json.dumps(HF_FEATURES).encode()}
        sink = pa.BufferOutputStream()
        pq.write_table(table.replace_schema_metadata(meta), sink, compression="zstd", write_page_checksum=True,
                       row_group_size=ROW_GROUP_ROWS)
        data = sink.getvalue().to_pybytes()
        write_below(fs, base, self.file, data, owner)
        ids = table.column("sample_id")
        return ShardEntry(self.file, self.index, table.num_rows, int(ids[0].as_py()), int(ids[-1].as_py()),
                          hashlib.sha256(data).hexdigest(), len(data), stats or {})


def recover_entries(uri: str, manifest: Manifest) -> list[tuple[ShardEntry, dict]]:
    """(entry, metadata) of each shard file under `uri` that verifies on its own, for when the manifest is
    lost: every page's CRC holds, its metadata names its shard index and it holds exactly that shard's
    ids. Whether its metadata's `settings` are the run's is the caller's to judge; files that fail any
    check are left out (and redone)."""
    fs, base = resolve(uri)
    found = []
    files = fs.get_file_info(pafs.FileSelector(join(base, DATA_DIR), allow_not_found=True))
    for info in sorted(files, key=lambda i: i.base_name):
        name = f"{DATA_DIR}/{info.base_name}"
        if not (info.base_name.startswith("train-") and name.endswith(".parquet")):
            continue
        data = read_bytes(fs, info.path)
        try:
            table = pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
            meta = parse_json((table.schema.metadata or {}).get(METADATA_KEY, b"{}"), "its metadata", ShardError)
        except (pa.ArrowException, OSError, ValueError):
            continue
        index = meta.get("shard") if isinstance(meta, dict) else None
        if not isinstance(index, int) or not 0 <= index < manifest.num_shards:
            continue
        shard = manifest.shard(index)
        ids = table.column("sample_id").to_numpy()
        if name != shard.file or not np.array_equal(ids, np.asarray(shard.sample_ids)):
            continue
        try:
            entry = ShardEntry(name, index, table.num_rows, int(ids[0]), int(ids[-1]),
                               hashlib.sha256(data).hexdigest(), len(data), meta.get("stats", {}))
        except ValidationError:  # its recorded stats are not what this build writes
            continue
        found.append((entry, meta))
    return found


# ---- readers -----------------------------------------------------------------------------

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
        require_entry(uri, entry, info.size if info.type == pafs.FileType.File else None)
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
    except FileNotFoundError:
        data = None
    require_entry(uri, entry, None if data is None else len(data),
                  hashlib.sha256(data).hexdigest() if verify and data is not None else None)
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
        want = np.asarray(manifest.shard(entry.index).sample_ids)
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
    return parse_json((schema.metadata or {}).get(METADATA_KEY, b"{}"), f"the metadata of {uri}/{entry.file}",
                      ShardError)
