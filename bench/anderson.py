"""Study: does Anderson acceleration (ParaTAA-style) cut the Jacobi iterations a block needs?

For each block of the model: calibration images pushed through `encode` give the block's
true input x; plain Jacobi over all T-1 tokens from the `z` start, and Jacobi with
Anderson mixing of the last m iterates (type II, a least-squares fit per sample), run
for --iters iterations. Prints the max abs error vs x after each iteration and the
iterations each needs to reach 1e-3 and 1e-4. An extra iteration costs one full
parallel pass either way (the mixing is a tiny least-squares solve), so Anderson
pays only where it needs fewer iterations.

    python bench/anderson.py                      # demo model, 8 mnist5k images
"""
from __future__ import annotations

import argparse

import torch

from tarflow import Guidance, SamplingSpec, load_checkpoint
from tarflow.calibration import block_pairs, calibration_batch
from tarflow.engine import EagerRun


@torch.inference_mode()
def errors_per_iteration(block, z, x_true, labels, iters: int, memory: int, init: str = "z") -> list[float]:
    """Max abs error (over rows) after each iteration; memory 0 is plain Jacobi."""
    worst = [0.0] * iters
    for r in range(z.shape[0]):  # one sample at a time: Anderson's mixing weights are per sample
        run = EagerRun(block, z[r:r + 1], None if labels is None else labels[r:r + 1], Guidance())
        T = run.num_tokens
        x, target = run.initial(init), block.permute(x_true[r:r + 1])
        F, G = [], []  # residuals and Jacobi images of the last memory + 1 iterates
        for k in range(iters):
            g = run.update(x, 1, T)
            new = g
            if memory:
                F, G = (F + [(g - x[:, 1:]).flatten()])[-(memory + 1):], (G + [g.flatten()])[-(memory + 1):]
                if len(F) > 1:
                    dF = torch.stack([b - a for a, b in zip(F, F[1:])], 1)
                    dG = torch.stack([b - a for a, b in zip(G, G[1:])], 1)
                    gamma = torch.linalg.lstsq(dF, F[-1].unsqueeze(1)).solution
                    new = (G[-1] - (dG @ gamma).squeeze(1)).view_as(g)
            x = x.clone()
            x[:, 1:] = new
            worst[k] = max(worst[k], (x - target).abs().max().item())
    return worst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="demo")
    ap.add_argument("--data", default="mnist5k")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--memory", type=int, nargs="+", default=[0, 1, 2, 3, 5])
    args = ap.parse_args(argv)
    path = args.checkpoint
    model = load_checkpoint(path).eval()
    calib = calibration_batch(model, args.data, args.images, seed=0)
    pairs = block_pairs(model, calib, SamplingSpec())
    print(f"model {path}, {args.images} {args.data} images; max abs error after iteration 1..{args.iters}")
    for i in reversed(range(len(model.blocks))):  # sampling order
        z, x = pairs[i]
        for m in args.memory:
            errs = errors_per_iteration(model.blocks[i], z, x, calib.labels, args.iters, m)
            reach = [next((k + 1 for k, e in enumerate(errs) if e <= t), None) for t in (1e-3, 1e-4)]
            name = "jacobi" if m == 0 else f"anderson m={m}"
            print(f"block {i} {name:<13} to 1e-3: {reach[0]!s:>4}  to 1e-4: {reach[1]!s:>4}  "
                  + " ".join(f"{e:.0e}" for e in errs), flush=True)


if __name__ == "__main__":
    main()
