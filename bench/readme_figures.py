"""The README's picture, measured: a run config's sampling spec at batch 1 (the demo's: guidance 3, one
denoising step), its auto plan computed here, and the same sample ids drawn sequentially and under that plan
as two PNG grids, with the time of each and their largest difference (model space). The report's grids are
the run's own batch size, where on a CPU the plan is sequential; at batch 1 it is not.

    python bench/readme_figures.py --out docs/figures          # profile + plan (minutes), then sample
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

import tarflow
from workflows.config import RunConfig
from workflows.report.grid import save_grid


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="jobs/configs/demo.yaml", help="run config whose model and sampling to use")
    ap.add_argument("--num-samples", type=int, default=16, help="sample ids 0..N-1 in each grid")
    ap.add_argument("--tol", type=float, default=None, help="the plan's tolerance (default: the config's)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one: a generate worker's share)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the two grids")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    cfg = RunConfig.load(args.config)
    model, provenance = cfg.model.load(with_metadata=True)
    model.eval()
    spec = dataclasses.replace(cfg.sampling.for_model(model.config.num_classes, provenance), batch_size=1)
    plan, _ = tarflow.auto_plan(model, spec, tol=args.tol or cfg.plan.tol, data=cfg.calibration.data,
                                num_images=cfg.calibration.num_images)
    print(f"auto plan at batch 1 ({cfg.name}, {torch.get_num_threads()} thread(s)): {plan.summary()}")
    ids = range(args.num_samples)
    exact = [tarflow.sample_ids(model, spec, [i]) for i in ids]
    fast = [tarflow.sample_ids(model, spec, [i], plan) for i in ids]
    seconds = [sum(o.stats.seconds for o in outs) for outs in (exact, fast)]
    error = max((a.images - b.images).abs().max().item() for a, b in zip(exact, fast))
    args.out.mkdir(parents=True, exist_ok=True)
    nrow = int(args.num_samples ** 0.5)
    for name, outs in (("sequential", exact), ("auto-plan", fast)):
        print(save_grid(torch.cat([o.images for o in outs]), args.out / f"samples-{cfg.name}-{name}-batch1.png", nrow))
    print(f"{args.num_samples} samples at batch 1: sequential {seconds[0]:.2f} s, plan {seconds[1]:.2f} s: "
          f"{seconds[0] / seconds[1]:.2f}x, max |error| {error:.1e}")


if __name__ == "__main__":
    main()
