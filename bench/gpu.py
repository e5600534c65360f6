"""The sampling engine on the published AFHQ-256 shape, torch only: wall time per batch, with CFG.

Runs with torch and this repository alone (`PYTHONPATH=. python bench/gpu.py`; no Ray, no
torch-fidelity). The model has the shape of apple/ml-tarflow's AFHQ-256 checkpoint (8 blocks x 8
layers, width 768, patch 8, T=1024 tokens of 192, 3 classes) with random weights, the output
projections perturbed so the flow is not the identity: sequential steps and fixed-budget plans cost
the same whatever the weights. Guidance as the paper's AFHQ FID runs (3.4, annealed). Rows:

  reference-style sequential  KV cache grown by concatenation, CFG's two passes one after the other
                              (as apple/ml-tarflow samples, and the naive reference in tests/)
  eager sequential            ours: preallocated cache, CFG batched into one forward
  captured sequential         ours, static shapes: token steps replay a CUDA graph per bucket of keys
                              (CPU: the static engine, run eagerly)
  paper 7-8-32-10 eager       the paper's AFHQ plan at its fixed budgets (tol 0), eager
  paper 7-8-32-10 captured    the same, each segment pass a CUDA graph
  one pass per block          one parallel pass over all T-1 tokens of every block: no plan is faster

It prints each row as it finishes, a table per batch size with the two targets' ratios, and the whole
table at the end; `--json` appends each row as a JSON line as it finishes, `--budget-seconds` starts no
further batch size after that long (`bench/gpu_check.sh` runs it so). `--device cpu --shape demo` runs
the same table on the shipped demo model here (the paper plan on its last block).

    PYTHONPATH=. python bench/gpu.py                             # H200: batch 32, 8, 128, bf16 autocast
    PYTHONPATH=. python bench/gpu.py --device cpu --shape demo   # this CPU: batch 1, 16, fp32
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from tarflow import Guidance, Model, Plan, SamplingSpec, load_checkpoint, sample, sample_noise, time_in_turns
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
    with torch.device(device):  # initialised where it runs: 463M parameters
        model = Model(**AFHQ)
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0.0, 0.002)  # zero at init (the identity flow): perturbed
    return model.eval()


def table(rows: list[dict]) -> None:
    def cell(value, form: str, width: int) -> str:
        return (format(value, form) if value is not None else "-").rjust(width)

    print(f"{'batch':>5} {'row':<28} {'s/batch':>9} {'vs reference':>13} {'vs eager seq':>13} {'max |diff|':>11}")
    for r in rows:
        print(f"{r['batch']:>5} {r['row']:<28} {r['seconds']:>9.3f} {cell(r['vs_reference'], '.2f', 12)}x "
              f"{cell(r['vs_eager_sequential'], '.2f', 12)}x {cell(r['max_abs_vs_eager_sequential'], '.1e', 11)}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", choices=["afhq", "demo"], default="afhq")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 32 8 128 (afhq), 1 16 (demo)")
    ap.add_argument("--autocast", choices=["fp32", "bf16"], default=None,
                    help="default: bf16 on CUDA (as the reference samples), fp32 on a CPU")
    ap.add_argument("--skip", nargs="*", default=[], help="rows to leave out, e.g. reference-style")
    ap.add_argument("--budget-seconds", type=float, default=None,
                    help="start no further batch size after this many seconds (the rows of a started one print as "
                         "they finish)")
    ap.add_argument("--json", default=None, help="append each row to this file as a JSON line, as it finishes")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    device = torch.device(args.device)
    model = build(args.shape, device)
    T, D, N = model.num_tokens, model.token_dim, len(model.blocks)
    batch_sizes = args.batch_sizes or ([32, 8, 128] if args.shape == "afhq" else [1, 16])
    autocast = args.autocast or ("bf16" if device.type == "cuda" else "fp32")
    g = Guidance(scale=3.4, annealed=True)
    spec = SamplingSpec(guidance=g, autocast=autocast)
    captured = "graph" if device.type == "cuda" else "static"
    tough = N - 1  # the block sampled first; block 7 on AFHQ, as the paper's plan names it
    paper = Plan.from_paper_notation(f"{tough}-8-32-10", N, T, tol=0.0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{args.shape}: {N} blocks x {len(model.blocks[0].attn_blocks)} layers, width {model.config.channels}, "
          f"T={T}, D={D}; {name}; torch {torch.__version__}; {autocast}; CFG {g.scale} annealed; "
          f"paper plan {paper.name}; captured engine: {captured}", flush=True)
    rows = []
    for B in batch_sizes:
        if args.budget_seconds is not None and time.perf_counter() - t_start > args.budget_seconds:
            print(f"batch {B}: not started, {args.budget_seconds:.0f} s budget spent", flush=True)
            continue
        noise = sample_noise(0, range(B), T, D, device)
        y = torch.arange(B, device=device) % max(model.config.num_classes, 1)

        spec_b = dataclasses.replace(spec, batch_size=B)  # the whole batch in one call

        def ours(plan, engine):
            return lambda n, labels: sample(model, n, labels, plan, spec_b, engine=engine).images

        runs = {
            "reference-style sequential": lambda n, labels: reference_sequential(model, n, labels, g),
            "eager sequential": ours(None, "eager"),
            "captured sequential": ours(None, captured),
            "paper eager": ours(paper, "eager"),
            "paper captured": ours(paper, captured),
            "one pass per block": lambda n, labels: one_pass_per_block(model, n, labels, spec_b),
        }
        seconds, images, batch_rows = {}, {}, []
        for label, fn in runs.items():
            if label.split()[0] in args.skip or label in args.skip:
                continue
            with spec.autocast_context(device.type):
                # a captured row's first run captures the graphs of its shape, once: the best of two is the replay
                (out,), seconds[label] = time_in_turns(model, noise, y, {label: fn}, 2 if "captured" in label else 1,
                                                       spec_b)[label]
                images[label] = out
            ref, eager = seconds.get("reference-style sequential"), seconds.get("eager sequential")
            err = None
            if label != "one pass per block" and "eager sequential" in images:
                err = (images[label].float() - images["eager sequential"].float()).abs().max().item()
            row = {"shape": args.shape, "device": name, "torch": torch.__version__, "autocast": autocast, "batch": B,
                   "row": label, "seconds": seconds[label], "vs_reference": ref / seconds[label] if ref else None,
                   "vs_eager_sequential": eager / seconds[label] if eager else None,
                   "max_abs_vs_eager_sequential": err}
            batch_rows.append(row)
            print(f"  batch {B:>4} {label:<28} {seconds[label]:9.3f} s", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
        table(batch_rows)
        exact = [seconds[k] for k in ("eager sequential", "captured sequential") if k in seconds]
        if "reference-style sequential" in seconds and exact:
            print(f"batch {B}: best exact option {seconds['reference-style sequential'] / min(exact):.2f}x the "
                  "reference-style sequential (target >= 10x at batch 32)")
        if "eager sequential" in seconds and "captured sequential" in seconds:
            print(f"batch {B}: captured sequential {seconds['eager sequential'] / seconds['captured sequential']:.2f}x "
                  "eager sequential (target >= 2x at batch 8)", flush=True)
        rows += batch_rows
    print()
    table(rows)


if __name__ == "__main__":
    main()
