"""Benchmark the generate stage: pipeline throughput vs direct sampling, and driver memory at scale.

    python bench/generate.py throughput [--checkpoint PATH] [--num-samples 1024] [--batch-size 16]
    python bench/generate.py scale [--workdir DIR] [--sizes 5000 50000]

`throughput`: images/s of `tarflow.sample` called directly in this process on the same
batches the pipeline samples, and of `generate` with 1 and 2 CPU actors on a local Ray
started beforehand, with `--threads` torch threads in the direct run and in each actor (1
by default: on a busy 2-core box two threads per process collapse under contention).
Pipeline time includes starting the actors, loading the model in them, noise, PNG
encoding, Parquet writes and the manifest; "steady" is actor-side time only (as if the
actors were already up). Time overhead = direct rate / pipeline rate - 1. Default model: the shipped demo checkpoint, else a random model of the
demo's shape (the same compute per sample).

`scale`: trains a tiny 8x8 `digits` model for about a minute (cached in the workdir), then
runs `generate` for each size in a fresh driver process and reports its peak RSS, the ids
the manifest lists, and images/s. Each run happens in a subprocess so peaks do not mix.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray runs workers at nice 15; on a shared box that, not the pipeline, decides how fast actors
# go next to a nice-0 direct run. Equal priority makes the comparison about the pipeline.
os.environ.setdefault("RAY_worker_niceness", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tarflow import Model, ModelRef, SamplingSpec, load_checkpoint, sample_ids, save_checkpoint  # noqa: E402


def _demo_or_stand_in(workdir: Path) -> tuple[str, str]:
    try:
        from tarflow.demo import demo_checkpoint
        return str(demo_checkpoint()), "demo checkpoint"
    except (ImportError, FileNotFoundError):
        torch.manual_seed(0)
        model = Model(1, 28, 2, 128, 4, 2, num_classes=10, head_dim=64)
        for block in model.blocks:
            torch.nn.init.normal_(block.proj_out.weight, std=0.02)
        path = save_checkpoint(model.eval(), workdir / "demo-shape-random.safetensors")
        return str(path), "random model of the demo's shape (28x28x1, patch 2, width 128, 4x2 layers)"


def _direct_rate(checkpoint: str, num_samples: int, batch_size: int, seed: int, threads: int) -> float:
    torch.set_num_threads(threads)
    model = load_checkpoint(checkpoint)
    spec = SamplingSpec(seed=seed, batch_size=batch_size)
    start = time.perf_counter()
    for s in range(0, num_samples, batch_size):
        sample_ids(model, spec, range(s, min(s + batch_size, num_samples)))
    return num_samples / (time.perf_counter() - start)


def _config(checkpoint: str, out: str, num_samples: int, seed: int, batch_size: int, shard_size: int, actors: int,
            num_cpus: float | None = None):
    from workflows.config import GenerateConfig, Resources, SampleSet

    return GenerateConfig(model=ModelRef(checkpoint), out=out,
                          samples=SampleSet(num_samples=num_samples, shard_size=shard_size),
                          spec=SamplingSpec(seed=seed, batch_size=batch_size),
                          resources=Resources(actors=actors, num_cpus=num_cpus))


def throughput(args) -> dict:
    import ray

    from workflows.stages.generate import generate
    from workflows.storage import shards as sh

    workdir = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    checkpoint, what = (args.checkpoint, args.checkpoint) if args.checkpoint else _demo_or_stand_in(workdir)
    cpus = os.cpu_count()
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    rates = {}
    for actors in (1, 2):
        # direct rate measured before each pipeline run and averaged, to share the machine's drift
        rates.setdefault("direct", []).append(
            _direct_rate(checkpoint, args.num_samples, args.batch_size, args.seed, args.threads))
        out = workdir / f"actors-{actors}"
        cfg = _config(checkpoint, str(out), args.num_samples, args.seed, args.batch_size, args.shard_size, actors,
                      float(args.threads))
        summary = generate(cfg, progress=False)
        shard_seconds = sum(e.stats["seconds"] for e in sh.read_manifest(str(out)).shards)
        rates[f"pipeline_{actors}_actor"] = [summary.images_per_s]
        # actor-side time only (noise, sampling, PNG, Parquet write), as if the actors were already up
        rates[f"pipeline_{actors}_actor_steady"] = [args.num_samples / (shard_seconds / actors)]
    ray.shutdown()
    shutil.rmtree(workdir, ignore_errors=True)
    rates = {k: sum(v) / len(v) for k, v in rates.items()}
    return {"model": what, "num_samples": args.num_samples, "batch_size": args.batch_size,
            "torch_threads_direct_and_per_actor": args.threads, "cpus": cpus,
            "load_average_1min_at_end": round(os.getloadavg()[0], 1),
            "images_per_s": {k: round(v, 2) for k, v in rates.items()},
            "time_overhead_vs_direct": {k: round(rates["direct"] / v - 1, 3) for k, v in rates.items() if k != "direct"}}


def _train_tiny(workdir: Path) -> str:
    from tarflow.train import TrainConfig, train

    out = workdir / "digits-tiny.safetensors"
    if not out.is_file():
        cfg = TrainConfig(dataset="digits", out=str(out), patch_size=2, width=64, num_blocks=4, layers_per_block=2,
                          head_dim=32, epochs=15, batch_size=64, lr=2e-3, warmup_steps=20, precision="fp32")
        start = time.perf_counter()
        train(cfg, progress=False, log=lambda *a: None)
        print(f"trained {out} in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    return str(out)


def scale_run(args) -> dict:
    """One generate run in this (fresh) process; reports the driver's peak RSS."""
    from workflows.stages.generate import generate
    from workflows.storage import shards as sh

    cfg = _config(args.checkpoint, args.out, args.num_samples, args.seed, args.batch_size, args.shard_size,
                  args.actors)
    summary = generate(cfg, progress=False)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    manifest = sh.verify_shards(args.out)
    ids = set()
    for entry in manifest.shards:
        ids.update(range(entry.first_id, entry.last_id + 1))
    return {"num_samples": args.num_samples, "driver_peak_rss_mib": round(peak_mib, 1),
            "manifest_rows": manifest.rows, "manifest_unique_ids": len(ids),
            "ids_are_0_to_n": ids == set(range(args.num_samples)), "shards": len(manifest.shards),
            "seconds": round(summary.seconds, 1), "images_per_s": round(summary.images_per_s, 1)}


def scale(args) -> dict:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = _train_tiny(workdir)
    results = []
    for n in args.sizes:
        out = workdir / f"set-{n}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, __file__, "scale-run", "--checkpoint", checkpoint, "--out", str(out),
               "--num-samples", str(n), "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size),
               "--actors", str(args.actors)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        shutil.rmtree(out, ignore_errors=True)
    small, large = results[0]["driver_peak_rss_mib"], results[-1]["driver_peak_rss_mib"]
    return {"checkpoint": checkpoint, "runs": results, "peak_rss_ratio_large_vs_small": round(large / small, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--checkpoint")
    t.add_argument("--num-samples", type=int, default=1024)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--shard-size", type=int, default=128)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1, help="torch threads of the direct run and of each actor")
    s = sub.add_parser("scale")
    s.add_argument("--workdir", default="/tmp/bench-generate-scale")
    s.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--shard-size", type=int, default=1024)
    s.add_argument("--actors", type=int, default=2)
    r = sub.add_parser("scale-run")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--num-samples", type=int, required=True)
    r.add_argument("--batch-size", type=int, required=True)
    r.add_argument("--shard-size", type=int, required=True)
    r.add_argument("--actors", type=int, required=True)
    r.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = {"throughput": throughput, "scale": scale, "scale-run": scale_run}[args.part](args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
