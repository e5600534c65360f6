"""Benchmark: the driver's per-shard bookkeeping stays flat from the first shard to the 10,000th.

Commits N shard records (no sampling) the way the generate stage does after each shard, then folds
them into the manifest as a finished run does, and prints the driver's seconds and bytes written per
shard for each thousand, the fold's cost, and the reading of the records on resume.

    python bench/manifest.py [--shards 10000] [--out DIR]        (a local path or any pyarrow.fs URI)
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

from workflows.storage import shards as sh


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=10_000)
    ap.add_argument("--shard-size", type=int, default=1024, help="samples per shard (10M samples at 10k shards)")
    ap.add_argument("--out", default=None, help="default: a fresh temporary folder")
    args = ap.parse_args(argv)
    uri = args.out or tempfile.mkdtemp(prefix="bench-manifest-")
    manifest = sh.Manifest({"bench": "manifest"}, args.shards * args.shard_size, args.shard_size)
    sh.write_manifest(uri, manifest)
    rows, seconds, written = [], 0.0, 0
    for index in range(args.shards):
        ids = manifest.shard_ids(index)
        entry = sh.ShardEntry(manifest.shard_file(index), index, len(ids), ids.start, ids.stop - 1, "f" * 64, 120_000_000,
                              {"batches": 8, "block_passes": [32] * 8, "fallbacks": 0, "device": "cuda",
                               "seconds": 61.5})
        t0 = time.perf_counter()
        written += sh.commit_shard(uri, entry)
        manifest.add(entry)
        seconds += time.perf_counter() - t0
        if (index + 1) % 1000 == 0:
            rows.append({"shards": f"{index - 998}-{index + 1}", "driver_ms_per_shard": round(seconds, 3),
                         "bytes_per_shard": round(written / 1000)})
            print(json.dumps(rows[-1]), flush=True)
            seconds, written = 0.0, 0
    t0 = time.perf_counter()
    read = sh.read_manifest(uri)
    resume_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sh.write_manifest(uri, read)
    fold_s = time.perf_counter() - t0
    first, last = rows[0], rows[-1]
    print(json.dumps({"uri": uri, "shards": args.shards,
                      "last_vs_first_thousand": {"time": round(last["driver_ms_per_shard"] / first["driver_ms_per_shard"], 2),
                                                 "bytes": round(last["bytes_per_shard"] / first["bytes_per_shard"], 3)},
                      "resume_read_s": round(resume_s, 2), "fold_s": round(fold_s, 2),
                      "folded_manifest_bytes": len(read.to_json())}))


if __name__ == "__main__":
    main()
