"""Golden check: hashes of `tarflow.sample` outputs over plans of every kind, to show a change keeps samples bitwise.

Each case samples with the public API on the eager engine (the CPU default) and records the sha256 of
the images (float32 bytes) and the solver statistics that decide them (passes, iterations, fallbacks,
residual, bf16 passes). Cases: every plan kind (sequential, Jacobi, GS-Jacobi with a short and a
one-token last segment, iteration caps, the zeros start, sliding windows at tol > 0 and 0, mixed
plans, a paper plan, `check_every`), guidance (scale, annealing, attn_temp, each `what`), labels
given / none / -1 and an unconditional model, batch 1 and 3, bf16 autocast, the bf16 start,
denoising, the divergence fallback, and the demo model (batch 2, no labels, a plan).

    PYTHONPATH=. python bench/golden.py --out /tmp/golden.json            # record (e.g. on main)
    PYTHONPATH=. python bench/golden.py --compare /tmp/golden.json        # after a change: N/N identical

Run both with the same torch and thread count (one thread here): hashes are bitwise.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import sampling_matrix  # noqa: E402  (the cases, shared with tests/test_engine_matrix.py)

import tarflow  # noqa: E402


def digest(out) -> dict:
    images = out.images.detach().float().contiguous().cpu()
    stats = [{"block": b.block, "passes": b.passes, "iterations": b.iterations, "fallbacks": b.fallbacks,
              "residual": repr(float(b.residual)), "coarse_passes": b.coarse_passes} for b in out.stats.blocks]
    return {"images": hashlib.sha256(images.numpy().tobytes()).hexdigest(),
            "stats": hashlib.sha256(json.dumps(stats, sort_keys=True).encode()).hexdigest(), "detail": stats}


def run(engine: str) -> dict:
    torch.set_num_threads(1)
    models = sampling_matrix.models()
    return {c.name: digest(sampling_matrix.run(c, models[c.model], engine)) for c in sampling_matrix.cases()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", help="write the hashes here")
    mode.add_argument("--compare", help="compare with hashes written earlier; exit 1 on any difference")
    ap.add_argument("--engine", default="eager", help="the engine to sample on (default eager)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    results = run(args.engine)
    seconds = time.perf_counter() - t0
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, sort_keys=True))
        print(f"{len(results)} cases of {tarflow.__file__} written to {args.out} in {seconds:.0f} s")
        return
    golden = json.loads(Path(args.compare).read_text())
    same_images = [k for k in golden if k in results and results[k]["images"] == golden[k]["images"]]
    same_stats = [k for k in golden if k in results and results[k]["stats"] == golden[k]["stats"]]
    for k in sorted(set(golden) | set(results)):
        if k not in results or k not in golden:
            print(f"  {k}: only in {'the golden file' if k in golden else 'this run'}")
        elif k not in same_images or k not in same_stats:
            what = [w for w, same in (("images", same_images), ("stats", same_stats)) if k not in same]
            print(f"  {k}: {' and '.join(what)} differ" + (f"\n    was {golden[k]['detail']}\n    now "
                                                             f"{results[k]['detail']}" if "stats" in what else ""))
    print(f"images {len(same_images)}/{len(golden)} identical, stats {len(same_stats)}/{len(golden)} identical "
          f"({len(results)} cases of {tarflow.__file__} run in {seconds:.0f} s)")
    sys.exit(0 if len(same_images) == len(same_stats) == len(golden) == len(results) else 1)


if __name__ == "__main__":
    main()
