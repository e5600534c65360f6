"""Benchmark: sequential vs the auto plan vs paper-style hand plans, measured in one run.

For each batch size: profile the model in this process (torch alone, calibration on
training images), compute the auto plan at --tol, then sample held-out noise with every plan and print
wall time, speedup over sequential, parallel passes (network calls) vs sequential
steps, max abs error vs sequential (model space) and the share of 8-bit pixels that
differ from sequential.

`--reference DIR` also times sequential and the same auto plan with another version of the `tarflow`
package (DIR is its package folder, e.g. of a checkout of main), in the same turns: how a change to
the solvers or engines moves the time of one plan, measured in one run.

    python bench/plans.py                        # demo model, CPU, batch 1 and 16
    python bench/plans.py --device cuda --batch-sizes 1 16 64
    git worktree add --detach /tmp/main main && python bench/plans.py --batch-sizes 1 --reference /tmp/main/tarflow
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from tarflow import Plan, SamplingSpec, load_checkpoint, time_in_turns
from tarflow.noise import sample_noise
from tarflow.profile import profile_model
from tarflow.schedule import hand_plan, schedule


def load_reference(folder: str):
    """The `tarflow` package in `folder`, imported as `tarflow_reference` beside this one."""
    spec = importlib.util.spec_from_file_location("tarflow_reference", Path(folder) / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="demo", help="model path, or 'demo' for the shipped demo model")
    ap.add_argument("--data", default="mnist5k", help="calibration images (dataset name or folder)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--num-images", type=int, default=16, help="held-out images per batch size (whole batches)")
    ap.add_argument("--calib-images", type=int, default=8, help="calibration images for the profile")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--hand", nargs="*", default=None,
                    help="paper-style plans, e.g. 3-8-32-10 (default: three around the highest-CRM block)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--reference", default=None,
                    help="another version's tarflow package folder: also time sequential and the auto plan with it")
    args = ap.parse_args(argv)
    reference = load_reference(args.reference) if args.reference else None

    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.checkpoint
    device = torch.device(args.device)
    model = load_checkpoint(path).eval()
    T, D = model.num_tokens, model.token_dim
    steps = len(model.blocks) * (T - 1)
    print(f"model {path}: {len(model.blocks)} blocks x {T} tokens, device {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    results = []
    for B in args.batch_sizes:
        spec = SamplingSpec(batch_size=B)
        t0 = time.perf_counter()
        prof = profile_model(model, spec, data=args.data, num_images=max(args.calib_images, B), device=args.device)
        t1 = time.perf_counter()
        auto = schedule(prof, model, tol=args.tol, device=device)
        t2 = time.perf_counter()
        shares = [b.crm_share for b in prof.blocks]
        tough = max(range(len(shares)), key=shares.__getitem__)
        specs = args.hand if args.hand is not None else [f"{tough}-8-32-10", f"{tough}-4-64-10",
                                                          f"{tough}-{T}-1-10"]
        plans = {"sequential": Plan.sequential(len(model.blocks), T), "auto": auto}
        plans.update({f"paper[{s}]": hand_plan(s, model) for s in specs})
        n = max(B, args.num_images // B * B)
        noise = sample_noise(10_000 + B, range(n), T, D).to(device)
        labels = torch.arange(n, device=device) % max(model.config.num_classes, 1)
        if not model.config.num_classes:
            labels = None
        m = model.to(device)
        if reference is not None:  # the same plans, run by the other version's solvers
            ref_spec = reference.SamplingSpec(batch_size=B)
            for name in ("sequential", "auto"):
                ref_plan = reference.Plan.from_dict(plans[name].to_dict())
                plans[f"{name} (reference)"] = \
                    lambda noise, y, p=ref_plan: reference.sample(m, noise, y, p, ref_spec)
        print(f"\nbatch {B}: profile {t1 - t0:.1f}s, plan {t2 - t1:.1f}s; CRM shares "
              + " ".join(f"{100 * s:.0f}%" for s in shares) + f"; auto plan: {auto.summary()}"
              + (f" (fell back: {auto.evidence['fallback']})" if auto.evidence["fallback"] else ""))
        print(f"{'plan':<22}{'seconds':>9}{'speedup':>9}{'passes':>9}{'steps':>7}{'max err':>10}{'8bit diff':>11}")
        # sample() waits for the device after every block, so wall times are complete on CUDA too
        timed = time_in_turns(m, noise, labels, plans, args.repeats, spec)
        ref = torch.cat([o.images for o in timed["sequential"][0]])
        ref_s = timed["sequential"][1]
        ref8 = to_uint8(ref)
        for name, (outs, secs) in timed.items():
            images = torch.cat([o.images for o in outs])
            passes = sum(o.stats.passes for o in outs) / len(outs)
            err = (images - ref).abs().max().item()
            diff8 = (to_uint8(images) != ref8).float().mean().item()
            summary = plans[name.removesuffix(" (reference)")].summary()
            row = {"batch_size": B, "plan": name, "plan_summary": summary, "seconds": secs,
                   "speedup": ref_s / secs, "passes": passes, "sequential_steps": steps, "max_abs_error": err,
                   "pixels_8bit_differ": diff8}
            results.append(row)
            same = name not in ("sequential", *(n for n in plans if callable(plans[n]))) \
                and plans[name].fingerprint() == plans["sequential"].fingerprint()
            print(f"{name:<22}{secs:>9.3f}{ref_s / secs:>8.2f}x{passes:>9.0f}{steps:>7}{err:>10.1e}{100 * diff8:>10.2f}%"
                  + ("  (= sequential: the ratio is timing noise)" if same else ""))
        if reference is not None:
            for name in ("sequential", "auto"):
                here, there = timed[name][1], timed[f"{name} (reference)"][1]
                print(f"{name}: {here:.3f} s with this code, {there:.3f} s with the reference: "
                      f"{there / here:.2f}x (above 1: this code is faster)")
        model = model.cpu()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
