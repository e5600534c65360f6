"""Benchmark distributed FID: feature-extraction throughput per actor count, and a large set end to end.

    python bench/fid.py throughput [--extractor mnist5k-classifier] [--num-images 5000] [--actors 1 2]
    python bench/fid.py scale --samples URI [--reference digits] [--actors 1]
    python bench/fid.py prc [--num-images 5000 50000] [--actors 1]

`throughput`: writes `--num-images` mnist5k digits (cycled) into Parquet shards, then for each
actor count starts a `FeaturePool` on a local 2-CPU Ray, waits until every actor has loaded its
extractor, and times `FeaturePool.stats` over the shards (PNG decode, extraction, per-shard float64
sums, driver merge). Prints images/s per actor count and their ratio to one actor.

`scale`: `evaluate_fid` of an existing shard set (e.g. the generation benchmark's 50,000 samples)
against a reference, sampling the driver's RSS every 0.2 s (from /proc: Linux): wall time, FID, and
driver memory at each tenth of the run, to show the driver does not grow with the number of
images. With `--cache-dir`, a second run finds the reference statistics cached and extracts only
the samples.

`prc`: the added cost of precision/recall. For each size, writes that many mnist5k digits (cycled)
as the samples and the same digits moved 2 pixels right as the reference, then runs
`evaluate_fid` with `metrics: [fid]` and with `[fid, prc]` in turns (best of `--repeats`), timing
each and sampling the driver's RSS: the second pass over the reference's images and the k-NN blocks
are what precision/recall add.

Each prints the command for a 50k Inception FID on a GPU cluster.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import ray  # noqa: E402

from workflows.config import FidSettings, Resources  # noqa: E402
from workflows.stages.fid import FeaturePool, evaluate_fid  # noqa: E402
from workflows.storage import shards as sh  # noqa: E402

GPU_COMMAND = ("RAY_ADDRESS=http://HEAD:8265 ray job submit --working-dir . -- tarflow-gs fid "
               "--samples s3://BUCKET/RUN/samples-KEY --reference /models/imagenet_128_fid_stats.pth "
               "--extractor inception-v3-compat --extractor-weights /weights/inception-compat.pth "
               "--actors 8 --num-gpus 1 --batch-size 500 --no-progress")


def _write_digits(uri: str, num_images: int, shard_size: int, shift: int = 0) -> None:
    """`num_images` mnist5k digits, moved `shift` pixels right, as a shard set; past the 5,000 digits the k-th
    cycle moves them k pixels down too, so no image repeats (repeats would give k-NN radii of 0)."""
    from tarflow.data import load_dataset

    digits = np.roll(sh.to_uint8(load_dataset("mnist5k").images.numpy()), shift, axis=2)
    index = np.arange(num_images)
    images = np.stack([np.roll(digits[i % len(digits)], i // len(digits), axis=0) for i in index])
    manifest = sh.Manifest(settings={"bench": "fid"}, num_samples=num_images, shard_size=shard_size)
    for index in range(manifest.num_shards):
        ids = np.asarray(manifest.shard_ids(index))
        table = sh.shard_table(ids, np.full(len(ids), -1), 0, [sh.encode_png(images[i]) for i in ids],
                               [[0]] * len(ids), np.zeros(len(ids)), np.zeros(len(ids)))
        manifest.add(manifest.shard(index).write(uri, table, {}))
    sh.write_manifest(uri, manifest)


def throughput(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bench-fid-"))
    uri = str(workdir / "shards")
    _write_digits(uri, args.num_images, args.shard_size)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    for actors in args.actors:
        settings = FidSettings(extractor=args.extractor, batch_size=args.batch_size)
        start = time.perf_counter()
        with FeaturePool(settings, Resources(actors=actors)) as pool:
            ray.get([actor.__ray_ready__.remote() for actor in pool.pool.actors])
            started = time.perf_counter()
            stats = pool.stats(uri)
            seconds = time.perf_counter() - started
        rows.append({"actors": actors, "images": stats.count, "pool_start_s": round(started - start, 2),
                     "extract_s": round(seconds, 2), "images_per_s": round(stats.count / seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)
    ray.shutdown()
    base = rows[0]["images_per_s"]
    for row in rows:
        row["speedup_vs_first"] = round(row["images_per_s"] / base, 2)
    return {"extractor": args.extractor, "cpus": 2, "runs": rows, "gpu_cluster_command": GPU_COMMAND}


def _rss_mib() -> float:
    # /proc (Linux) rather than psutil, which the project does not depend on
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def scale(args) -> dict:
    samples_mib: list[tuple[float, float]] = []
    done = threading.Event()

    def watch():
        t0 = time.perf_counter()
        while not done.is_set():
            samples_mib.append((time.perf_counter() - t0, _rss_mib()))
            done.wait(0.2)

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    settings = FidSettings(extractor=args.extractor, batch_size=args.batch_size)
    result = evaluate_fid(args.samples, args.reference, settings, Resources(actors=args.actors),
                          cache_dir=args.cache_dir)
    done.set()
    watcher.join()
    ray.shutdown()
    rss = np.array([m for _, m in samples_mib])
    deciles = [round(float(rss[min(len(rss) - 1, len(rss) * k // 10)]), 1) for k in range(1, 11)]
    return {"fid": round(result.fid, 4), "samples": result.sample_count, "reference": result.reference,
            "reference_count": result.reference_count, "extractor": result.extractor,
            "image_size": result.image_size, "wall_s": round(result.seconds, 1),
            "images_per_s": round(result.sample_count / result.seconds, 1),
            "driver_rss_mib": {"start": round(float(rss[0]), 1), "at_10_20_to_100pct_of_run": deciles,
                               "peak": round(float(rss.max()), 1)},
            "gpu_cluster_command": GPU_COMMAND}


def _watched(fn):
    """(fn(), peak driver RSS in MiB while it ran)."""
    peak, done = [_rss_mib()], threading.Event()

    def watch():
        while not done.wait(0.1):
            peak.append(_rss_mib())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        return fn(), max(peak + [_rss_mib()])
    finally:
        done.set()
        watcher.join()


def prc(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bench-prc-"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    for n in args.num_images:
        sets = [str(workdir / f"{name}-{n}") for name in ("samples", "reference")]
        for uri, shift in zip(sets, (0, 2)):
            _write_digits(uri, n, args.shard_size, shift)
        times = {"fid": [], "fid+prc": []}
        peaks = dict.fromkeys(times, 0.0)
        result = None
        for _ in range(args.repeats):  # in turns: both see the same machine
            for label, metrics in (("fid", ["fid"]), ("fid+prc", ["fid", "prc"])):
                settings = FidSettings(extractor=args.extractor, batch_size=args.batch_size, metrics=metrics)
                out, peak = _watched(lambda: evaluate_fid(sets[0], sets[1], settings, Resources(actors=args.actors),
                                                          cache_dir=None, write_result=False))
                times[label].append(out.seconds)
                peaks[label] = max(peaks[label], peak)
                result = out if label == "fid+prc" else result
        best = {k: min(v) for k, v in times.items()}
        rows.append({"images_per_side": n, "fid_s": round(best["fid"], 1), "fid_prc_s": round(best["fid+prc"], 1),
                     "prc_cost_ratio": round(best["fid+prc"] / best["fid"], 2),
                     "driver_peak_rss_mib": {k: round(v, 1) for k, v in peaks.items()},
                     "precision": round(result.precision_recall.precision, 4),
                     "recall": round(result.precision_recall.recall, 4)})
        print(json.dumps(rows[-1]), flush=True)
    ray.shutdown()
    return {"extractor": args.extractor, "cpus": 2, "actors": args.actors, "repeats": args.repeats, "runs": rows,
            "gpu_cluster_command": GPU_COMMAND.replace("--no-progress", "--metrics fid,is,kid,prc --no-progress")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--extractor", default="mnist5k-classifier")
    t.add_argument("--num-images", type=int, default=5000)
    t.add_argument("--shard-size", type=int, default=500)
    t.add_argument("--batch-size", type=int, default=250)
    t.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    s = sub.add_parser("scale")
    s.add_argument("--samples", required=True)
    s.add_argument("--reference", default="digits")
    s.add_argument("--extractor", default="mnist5k-classifier")
    s.add_argument("--actors", type=int, default=1)
    s.add_argument("--batch-size", type=int, default=500)
    s.add_argument("--cache-dir", default=None, help="reference cache (default: none, so the reference is extracted too)")
    p = sub.add_parser("prc")
    p.add_argument("--num-images", type=int, nargs="+", default=[5000, 50000])
    p.add_argument("--extractor", default="mnist5k-classifier")
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps({"throughput": throughput, "scale": scale, "prc": prc}[args.mode](args), indent=1))


if __name__ == "__main__":
    main()
