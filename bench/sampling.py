"""Sequential sampling vs the parallel bound, measured in one run.

For each batch size: the wall time of exact sequential sampling (preallocated KV
cache, CFG passes batched), the time of ONE parallel pass over all T-1 tokens of
every block (no plan can use fewer passes, so this bounds any Jacobi-style
speedup), and their ratio; then the same with classifier-free guidance.

    python bench/sampling.py [--checkpoint PATH] [--batch-sizes 1 16 64] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import functools

import torch

from tarflow import Guidance, SamplingSpec, load_checkpoint, time_in_turns
from tarflow.noise import sample_noise
from tarflow.sampling import one_pass_per_block


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="default: the shipped demo model")
    ap.add_argument("--in-channels", type=int, default=3)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--guidance", type=float, default=1.5)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    model = load_checkpoint(args.checkpoint or "demo", in_channels=args.in_channels).to(device)
    T, D, N = model.num_tokens, model.token_dim, len(model.blocks)
    classes = model.config.num_classes
    print(f"model: {N} blocks x {T} tokens (D={D}), width {model.config.channels}; device {device}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'batch':>5} {'cfg':>4} {'sequential s':>13} {'1 pass/block s':>15} {'bound ratio':>12} "
          f"{'pass = seq steps':>17}")
    for B in args.batch_sizes:
        noise = sample_noise(0, range(B), T, D, device)
        labels = torch.arange(B, device=device) % classes if classes else None
        for g in (0.0, args.guidance):
            spec = SamplingSpec(guidance=Guidance(scale=g, annealed=True), batch_size=B)
            timed = time_in_turns(model, noise, labels, {
                "sequential": None, "one": functools.partial(one_pass_per_block, model, spec=spec)}, args.repeats, spec)
            seq, one = timed["sequential"][1], timed["one"][1]
            # one pass over T-1 tokens costs as much as this many sequential steps
            steps_per_pass = one / (seq / (T - 1))
            print(f"{B:>5} {'yes' if g else 'no':>4} {seq:>13.4f} {one:>15.4f} {seq / one:>11.1f}x {steps_per_pass:>17.1f}")


if __name__ == "__main__":
    main()
