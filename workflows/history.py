"""The speed/quality history: one Parquet row per model per measurement, appended by the nightly job
and by each pipeline run, read back for the report's over-time figures and the regression gate."""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field, fields

import pyarrow as pa
import pyarrow.parquet as pq

from . import shards as sh
from .report import HistoryPoint

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

    def point(self) -> HistoryPoint:
        return HistoryPoint(self.timestamp, self.model, self.plan, self.speedup, self.max_abs_error, self.fid_plan,
                            self.fid_sequential)


def read_history(uri: str) -> list[HistoryRow]:
    """All rows, oldest first; [] when the table does not exist yet."""
    fs, path = sh.resolve(uri)
    if fs.get_file_info(path).type == sh.pafs.FileType.NotFound:
        return []
    with fs.open_input_file(path) as f:
        table = pq.read_table(f)
    missing = [name for name in SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"history table {uri} lacks column(s) {missing}: not a tarflow-gs history")
    rows = [HistoryRow(**{**r, "others": json.loads(r["others"] or "{}")})
            for r in table.select(SCHEMA.names).to_pylist()]
    return sorted(rows, key=lambda r: r.timestamp)


def append_history(uri: str, new_rows: list[HistoryRow]) -> None:
    """Rewrite the table with the new rows added; atomic, so a crash leaves the old table whole."""
    rows = read_history(uri) + list(new_rows)
    columns = {f.name: [] for f in fields(HistoryRow)}
    for r in rows:
        for name, value in asdict(r).items():
            columns[name].append(json.dumps(value, sort_keys=True) if name == "others" else value)
    table = pa.Table.from_pydict(columns, schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs, path = sh.resolve(uri)
    sh.write_atomic(fs, path, buf.getvalue())
