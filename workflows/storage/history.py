"""The speed/quality history: one row per model per measurement, appended by the nightly job and by
each pipeline run, read back for the report's over-time figures and the regression gate.

The table is a folder of Parquet files, one per append, written atomically under a unique name:
appends never rewrite earlier rows, so two runs appending at once both keep their rows, and any
Parquet reader opens the folder as one table (`pyarrow.dataset`, pandas, DuckDB). Reading checks each
file against the schema and each row against `HistoryRow`, and names the file that is not a history file
(a stray upload, another tool's table, a number out of range, a page whose checksum fails) instead of
failing somewhere inside Arrow or comparing against NaN or a flipped bit."""
from __future__ import annotations

import io
import json
import uuid
from dataclasses import asdict, field, fields
from datetime import datetime, timezone
from typing import Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, with_config
from pydantic.dataclasses import dataclass
from typing_extensions import TypedDict

from tarflow.schema import STRICT_FIELDS, SchemaError, parse_json, validate

from ..fidelity.registry import BETTER_HIGHER
from .files import join, resolve, write_below

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
    ("accelerator", pa.string()),  # what timed it: the GPU's model name, or the CPU's
    ("run_id", pa.string()),  # the run that appended the row: a retry of that run finds it and appends none
    ("metrics", pa.string()),  # JSON: the plan's other metrics from its FID pass ({"precision": 0.81, ...})
    ("fid_sequential_se", pa.float64()),  # the jackknife standard errors of a paired FID (`fidelity.paired`)
    ("fid_difference_se", pa.float64()),
])
NULLABLE = {"fid_sequential", "fid_plan", "fid_sequential_se", "fid_difference_se"}
# columns that files written before they existed lack: read as their defaults (an unknown accelerator is
# compared with nothing, so such rows are never a baseline)
ADDED_LATER = {"accelerator": "", "run_id": "", "metrics": "{}", "fid_sequential_se": None,
               "fid_difference_se": None}
METRIC_NAMES = tuple(BETTER_HIGHER)
JSON_COLUMNS = ("others", "metrics")


class HistoryError(ValueError):
    """A history location that holds something other than a tarflow-gs history."""


# measured numbers, here and in the report's data: finite (NaN and inf refused), in range; a value not
# measured is None (a FID not computed), never NaN
MEASURED = {**STRICT_FIELDS, "validate_assignment": True}
Fid = NonNegativeFloat | None  # None: not computed


@with_config(STRICT_FIELDS)
class HandPlanResult(TypedDict, total=False):
    """A hand plan timed beside the auto plan on the same noise (`HistoryRow.others`)."""

    speedup: PositiveFloat
    passes: PositiveInt
    max_abs_error: NonNegativeFloat
    fid: Fid


@dataclass(config=MEASURED)
class HistoryRow:
    """One model measured once, checked when made and when read: every number is finite and in range.
    Not measured: `fid_sequential` / `fid_plan` None (no FID of that sampler), `fid_extractor` "" and
    `fid_num_samples` 0 (no FID at all)."""

    timestamp: str
    model: str
    model_hash: str
    plan: str
    plan_hash: str
    device: str
    batch_size: PositiveInt
    sequential_seconds: PositiveFloat
    plan_seconds: PositiveFloat
    speedup: PositiveFloat
    sequential_passes: PositiveInt
    plan_passes: PositiveInt
    max_abs_error: NonNegativeFloat
    fid_sequential: Fid = None
    fid_plan: Fid = None
    fid_extractor: str = ""
    fid_num_samples: NonNegativeInt = 0
    others: dict[str, HandPlanResult] = field(default_factory=dict)
    passed: bool = True
    accelerator: str = ""
    run_id: str = ""
    metrics: dict[Literal[METRIC_NAMES], float] = field(default_factory=dict)  # the plan's, besides FID
    # with fid_sequential and fid_plan over the same ids: sequential's standard error (the FID's own sampling
    # noise) and the paired one of their difference; None: not compared
    fid_sequential_se: Fid = None
    fid_difference_se: Fid = None


def read_history(uri: str) -> list[HistoryRow]:
    """All rows, oldest first; [] when the table does not exist yet."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type != pafs.FileType.Directory:
        raise HistoryError(f"history {uri} is a file: a history is a folder of Parquet files (one per append)")
    # names starting with "." or "_" (temporaries, markers) are skipped, as every Parquet reader skips them
    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path))
                   if i.type == pafs.FileType.File and not i.base_name.startswith((".", "_")))
    rows = [row for f in files for row in _read_file(fs, f, uri)]
    return sorted(rows, key=lambda r: r.timestamp)


def _read_file(fs: pafs.FileSystem, path: str, uri: str) -> list[HistoryRow]:
    name = path.rsplit("/", 1)[-1]
    where = f"history {uri}: {name}"
    try:
        table = pq.read_table(path, filesystem=fs, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as e:
        if "checksum" in str(e):
            raise HistoryError(f"{where} is corrupt ({e}): its rows cannot be trusted; restore the file from a copy, "
                               "or move it out of the history folder") from None
        raise HistoryError(_stray(where, f"not a Parquet file ({e})")) from None
    problems = []
    for f in SCHEMA:
        if f.name not in table.column_names:
            if f.name not in ADDED_LATER:
                problems.append(f"no column {f.name}")
        elif table.schema.field(f.name).type != f.type:
            problems.append(f"column {f.name} is {table.schema.field(f.name).type}, not {f.type}")
        elif f.name not in NULLABLE and table.column(f.name).null_count:
            problems.append(f"column {f.name} has empty values")
    if problems:
        raise HistoryError(_stray(where, f"not a tarflow-gs history file ({'; '.join(problems)})"))
    names = [f.name for f in SCHEMA if f.name in table.column_names]
    rows = []
    for i, r in enumerate(table.select(names).to_pylist()):
        r = {**ADDED_LATER, **r}
        try:
            rows.append({**r, **{name: parse_json(r[name] or "{}", f"rows[{i}].{name}", HistoryError)
                                 for name in JSON_COLUMNS}})
        except HistoryError as e:
            raise HistoryError(_stray(where, f"not a tarflow-gs history file ({e})")) from None
    try:
        return validate(list[HistoryRow], rows, "rows")
    except SchemaError as e:
        raise HistoryError(_stray(where, f"not a tarflow-gs history file ({e})")) from None


def _stray(where: str, what: str) -> str:
    return f"{where} is {what}; a history folder holds only the files tarflow-gs appends: move it elsewhere"


def append_history(uri: str, new_rows: list[HistoryRow]) -> None:
    """Add rows as one new Parquet file in the table's folder."""
    if not new_rows:
        return
    columns = {f.name: [] for f in fields(HistoryRow)}
    for r in new_rows:
        for name, value in asdict(r).items():
            columns[name].append(json.dumps(value, sort_keys=True) if name in JSON_COLUMNS else value)
    buf = io.BytesIO()
    # with page checksums, verified on read (as shards are): a flipped bit is an error, never a number the
    # gate compares
    pq.write_table(pa.Table.from_pydict(columns, schema=SCHEMA), buf, write_page_checksum=True)
    fs, path = resolve(uri)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    write_below(fs, path, f"rows-{stamp}-{uuid.uuid4().hex[:8]}.parquet", buf.getvalue())
