"""The speed/quality history: one row per model per measurement, appended by the nightly job and by
each pipeline run, read back for the report's over-time figures and the regression gate.

The table is a folder of Parquet files, one per append, written atomically under a unique name:
appends never rewrite earlier rows, so two runs appending at once both keep their rows, and any
Parquet reader opens the folder as one table (`pyarrow.dataset`, pandas, DuckDB)."""
from __future__ import annotations

import io
import json
import uuid
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .files import join, resolve, write_atomic

SCHEMA = pa.schema([
    ("timestamp", pa.string()),  # ISO 8601, UTC
    ("model", pa.string()),
    ("model_hash", pa.string()),
    ("plan", pa.string()),
    ("plan_hash", pa.string()),
    ("device", pa.string()),
    ("batch_size", pa.int32()),
    ("sequential_seconds", pa.float64()),
    ("plan_seconds", pa.float64()),
    ("speedup", pa.float64()),
    ("sequential_passes", pa.int64()),
    ("plan_passes", pa.int64()),
    ("max_abs_error", pa.float64()),
    ("fid_sequential", pa.float64()),
    ("fid_plan", pa.float64()),
    ("fid_extractor", pa.string()),
    ("fid_num_samples", pa.int64()),
    ("others", pa.string()),  # JSON: hand plans' {name: {speedup, passes, max_abs_error, fid}}
    ("passed", pa.bool_()),  # the regression gate's verdict on this row
])


class HistoryError(ValueError):
    """A history location that holds something other than a tarflow-gs history."""


@dataclass
class HistoryRow:
    timestamp: str
    model: str
    model_hash: str
    plan: str
    plan_hash: str
    device: str
    batch_size: int
    sequential_seconds: float
    plan_seconds: float
    speedup: float
    sequential_passes: int
    plan_passes: int
    max_abs_error: float
    fid_sequential: float | None = None
    fid_plan: float | None = None
    fid_extractor: str = ""
    fid_num_samples: int = 0
    others: dict = field(default_factory=dict)
    passed: bool = True


def read_history(uri: str) -> list[HistoryRow]:
    """All rows, oldest first; [] when the table does not exist yet."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type != pafs.FileType.Directory:
        raise HistoryError(f"history {uri} is a file: a history is a folder of Parquet files (one per append)")
    table = ds.dataset(path, filesystem=fs, format="parquet", schema=SCHEMA).to_table()
    rows = [HistoryRow(**{**r, "others": json.loads(r["others"] or "{}")}) for r in table.to_pylist()]
    return sorted(rows, key=lambda r: r.timestamp)


def append_history(uri: str, new_rows: list[HistoryRow]) -> None:
    """Add rows as one new Parquet file in the table's folder."""
    if not new_rows:
        return
    columns = {f.name: [] for f in fields(HistoryRow)}
    for r in new_rows:
        for name, value in asdict(r).items():
            columns[name].append(json.dumps(value, sort_keys=True) if name == "others" else value)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pydict(columns, schema=SCHEMA), buf)
    fs, path = resolve(uri)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    write_atomic(fs, join(path, f"rows-{stamp}-{uuid.uuid4().hex[:8]}.parquet"), buf.getvalue())
