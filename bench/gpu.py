"""The sampling engine on the published AFHQ-256 shape, torch only: wall time per batch, with CFG.

Runs with torch and this repository alone (`PYTHONPATH=. python bench/gpu.py`; no Ray, no
torch-fidelity). The model has the shape of apple/ml-tarflow's AFHQ-256 checkpoint (8 blocks x 8
layers, width 768, patch 8, T=1024 tokens of 192, 3 classes) with random weights, the output
projections perturbed so the flow is not the identity: sequential steps and fixed-budget plans cost
the same whatever the weights. Guidance as the paper's AFHQ FID runs (3.4, annealed). Rows:

  reference-style sequential  KV cache grown by concatenation, CFG's two passes one after the other
                              (as apple/ml-tarflow samples, and the naive reference in tests/)
  eager sequential            ours: preallocated cache, CFG batched into one forward
  captured sequential         ours, static shapes, one CUDA graph per token step (CPU: static, eager)
  paper 7-8-32-10 eager       the paper's AFHQ plan at its fixed budgets (tol 0), eager
  paper 7-8-32-10 captured    the same, each segment pass a CUDA graph
  one pass per block          one parallel pass over all T-1 tokens of every block: no plan is faster

It prints a table of seconds per batch and ratios, then one JSON line. `--device cpu --shape demo`
runs the same table on the shipped demo model here (the paper plan on its last block).

    PYTHONPATH=. python bench/gpu.py                             # H200: batch 8, 32, 128, bf16 autocast
    PYTHONPATH=. python bench/gpu.py --device cpu --shape demo   # this CPU: batch 1, 16, fp32
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from tarflow import Guidance, Model, Plan, SamplingSpec, load_checkpoint, sample, sample_noise
from tarflow.sampling import one_pass_per_block

AFHQ = dict(in_channels=3, img_size=256, patch_size=8, channels=768, num_blocks=8, layers_per_block=8, num_classes=3)


class ConcatCache:
    """The reference's KV cache: keys/values of each layer grown by torch.cat at every step."""

    def __init__(self, num_layers: int):
        self.k, self.v = [None] * num_layers, [None] * num_layers

    def write(self, layer, start, k, v):
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


@torch.inference_mode()
def reference_sequential(model: Model, noise: torch.Tensor, y: torch.Tensor, g: Guidance) -> torch.Tensor:
    """Token by token, the conditional and unconditional passes serial, each with a concatenated cache."""
    x = noise.float() * model.var.sqrt()
    T = model.num_tokens
    weights = g.weights(T, x.device)
    for block in reversed(model.blocks):
        z = block.permute(x)
        out = z.clone()
        pos = block.permute(block.pos_embed, 0)
        cond, uncond = block.class_embedding(y, len(y)), block.class_embedding(None, len(y))
        caches = ConcatCache(len(block.attn_blocks)), ConcatCache(len(block.attn_blocks))
        for t in range(1, T):
            inp = out[:, t - 1:t]
            a_c, b_c = block.params(inp, pos[t - 1:t], cond, None, caches[0], t - 1)
            a_u, b_u = block.params(inp, pos[t - 1:t], uncond, None, caches[1], t - 1)
            w = weights[t]
            a, b = a_c + w * (a_c - a_u), b_c + w * (b_c - b_u)
            out[:, t:t + 1] = z[:, t:t + 1] * a.float().exp() + b.float()
        x = block.permute(out)
    return model.unpatchify(x)


def build(shape: str, device: torch.device) -> Model:
    if shape == "demo":
        return load_checkpoint("demo").eval().to(device)
    torch.manual_seed(0)
    model = Model(**AFHQ)
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0.0, 0.002)  # zero at init (the identity flow): perturbed
    return model.eval().to(device)


def timed(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", choices=["afhq", "demo"], default="afhq")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 8 32 128 (afhq), 1 16 (demo)")
    ap.add_argument("--autocast", choices=["fp32", "bf16"], default=None,
                    help="default: bf16 on CUDA (as the reference samples), fp32 on a CPU")
    ap.add_argument("--skip", nargs="*", default=[], help="rows to leave out, e.g. reference-style")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    model = build(args.shape, device)
    T, D, N = model.num_tokens, model.token_dim, len(model.blocks)
    batch_sizes = args.batch_sizes or ([8, 32, 128] if args.shape == "afhq" else [1, 16])
    autocast = args.autocast or ("bf16" if device.type == "cuda" else "fp32")
    g = Guidance(scale=3.4, annealed=True)
    spec = SamplingSpec(guidance=g, autocast=autocast)
    captured = "graph" if device.type == "cuda" else "static"
    tough = N - 1  # the block sampled first; block 7 on AFHQ, as the paper's plan names it
    paper = Plan.from_paper_notation(f"{tough}-8-32-10", N, T, tol=0.0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{args.shape}: {N} blocks x {len(model.blocks[0].attn_blocks)} layers, width {model.config.channels}, "
          f"T={T}, D={D}; {name}; torch {torch.__version__}; {autocast}; CFG {g.scale} annealed; "
          f"paper plan {paper.name}; captured engine: {captured}")
    rows = []
    for B in batch_sizes:
        noise = sample_noise(0, range(B), T, D, device)
        y = torch.arange(B, device=device) % max(model.config.num_classes, 1)

        def ours(plan, engine):
            return lambda: sample(model, noise, y, plan, spec, engine=engine).images

        runs = {
            "reference-style sequential": lambda: reference_sequential(model, noise, y, g),
            "eager sequential": ours(None, "eager"),
            "captured sequential": ours(None, captured),
            "paper eager": ours(paper, "eager"),
            "paper captured": ours(paper, captured),
            "one pass per block": lambda: one_pass_per_block(model, noise, y, spec),
        }
        seconds, images = {}, {}
        for label, fn in runs.items():
            if label.split()[0] in args.skip or label in args.skip:
                continue
            with spec.autocast_context(device.type):
                if "captured" in label:
                    timed(fn, device)  # first batch of a shape: the graphs are captured here, once
                seconds[label], images[label] = timed(fn, device)
            print(f"  batch {B:>4} {label:<28} {seconds[label]:9.3f} s", flush=True)
        ref = seconds.get("reference-style sequential")
        eager = seconds.get("eager sequential")
        for label, s in seconds.items():
            err = None
            if label != "one pass per block" and "eager sequential" in images:
                err = (images[label].float() - images["eager sequential"].float()).abs().max().item()
            rows.append({"batch": B, "row": label, "seconds": s, "vs_reference": ref / s if ref else None,
                         "vs_eager_sequential": eager / s if eager else None, "max_abs_vs_eager_sequential": err})
    print(f"\n{'batch':>5} {'row':<28} {'s/batch':>9} {'vs reference':>13} {'vs eager seq':>13} {'max |diff|':>11}")
    for r in rows:
        fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
        print(f"{r['batch']:>5} {r['row']:<28} {r['seconds']:>9.3f} {fmt(r['vs_reference'], '12.2f')}x "
              f"{fmt(r['vs_eager_sequential'], '12.2f')}x {fmt(r['max_abs_vs_eager_sequential'], '11.1e')}")
    print(json.dumps({"shape": args.shape, "device": name, "torch": torch.__version__, "autocast": autocast,
                      "rows": rows}))


if __name__ == "__main__":
    main()
