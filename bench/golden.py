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
from conftest import make_tiny_model  # noqa: E402  (the test suite's tiny models)

import tarflow  # noqa: E402
from tarflow import Denoise, GSJacobi, Guidance, Jacobi, Plan, SamplingSpec, Sequential, Sliding, \
    load_checkpoint, sample, sample_noise  # noqa: E402

CFG = Guidance(scale=1.5, annealed=True, attn_temp=0.7)
GUIDANCE = {"plain": Guidance(), "cfg": Guidance(scale=1.5), "annealed_temp": CFG,
            "what_a": Guidance(scale=1.0, what="a"), "what_b": Guidance(scale=1.0, what="b", annealed=True, attn_temp=1.3)}
BLOCK_PLANS = {
    "jacobi": Jacobi(tol=1e-5),
    "jacobi_zeros": Jacobi(tol=1e-4, init="zeros"),
    "jacobi_every4": Jacobi(tol=1e-5, check_every=4),
    "gs6_short_last": GSJacobi(segment_len=6, tol=1e-5),  # 15 tokens: 6 + 6 + 3
    "gs7_one_token_last": GSJacobi(segment_len=7, tol=1e-5),  # 7 + 7 + 1
    "gs4_cap2": GSJacobi(segment_len=4, tol=1e-4, max_iters=2),
    "gs5_tol0": GSJacobi(segment_len=5, tol=0.0),
    "sliding6": Sliding(window=6, tol=1e-5),
    "sliding4_tol0": Sliding(window=4, tol=0.0),
    "jacobi_bf16_start": Jacobi(tol=1e-6, coarse="bf16", coarse_tol=1e-2),
    "gs5_bf16_start": GSJacobi(segment_len=5, tol=1e-5, coarse="bf16", coarse_tol=1e-2),
}


def cases():
    """(name, model key, batch, labels, plan factory(model), spec, divergence bound or None)."""
    out = []
    for name, bp in BLOCK_PLANS.items():
        for g in ("plain", "annealed_temp"):
            out.append((f"{name}/{g}/b3", "tiny", 3, [1, 2, 3], bp, SamplingSpec(guidance=GUIDANCE[g]), None))
    for g in GUIDANCE:
        out.append((f"sequential/{g}/b3", "tiny", 3, [0, 7, 3], None, SamplingSpec(guidance=GUIDANCE[g]), None))
        out.append((f"gs6/{g}/b3", "tiny", 3, [0, 7, 3], GSJacobi(segment_len=6, tol=1e-5),
                    SamplingSpec(guidance=GUIDANCE[g]), None))
    for labels, tag in (([5], "b1"), (None, "b3_none"), ([-1, 4, -1], "b3_minus1")):
        batch = 1 if labels == [5] else 3
        for pname, bp in (("sequential", None), ("jacobi", Jacobi(tol=1e-5)), ("sliding6", Sliding(window=6, tol=1e-5))):
            for g in ("plain", "annealed_temp"):
                out.append((f"{pname}/{g}/{tag}", "tiny", batch, labels, bp, SamplingSpec(guidance=GUIDANCE[g]), None))
    for pname, bp in (("sequential", None), ("jacobi", Jacobi(tol=1e-5)), ("gs5", GSJacobi(segment_len=5, tol=1e-5)),
                      ("sliding6", Sliding(window=6, tol=1e-5))):
        for g, guid in (("plain", Guidance()), ("temp_only", Guidance(scale=2.0, attn_temp=0.7, annealed=True))):
            out.append((f"uncond/{pname}/{g}/b2", "uncond", 2, None, bp, SamplingSpec(guidance=guid), None))
    bf16 = SamplingSpec(autocast="bf16")
    for pname, bp in (("sequential", None), ("gs5_tol0", GSJacobi(segment_len=5, tol=0.0)), ("jacobi", Jacobi(tol=1e-4)),
                      ("sliding6", Sliding(window=6, tol=1e-4)), ("jacobi_bf16_start", BLOCK_PLANS["jacobi_bf16_start"])):
        out.append((f"autocast_bf16/{pname}/b2", "tiny", 2, [3, 8], bp, bf16, None))
    out.append(("autocast_bf16/gs6/cfg/b2", "tiny", 2, [3, 8], GSJacobi(segment_len=6, tol=1e-4),
                SamplingSpec(autocast="bf16", guidance=CFG), None))
    denoised = SamplingSpec(denoise=Denoise(multiplier=1.0, noise_std=0.05))
    out.append(("denoise/sequential/b2", "tiny", 2, [1, 2], None, denoised, None))
    out.append(("denoise/jacobi/cfg/b2", "tiny", 2, [1, 2], Jacobi(tol=1e-5),
                SamplingSpec(guidance=CFG, denoise=Denoise(multiplier=0.8, noise_std=0.05)), None))
    for pname, bp in (("gs5_tol0", GSJacobi(segment_len=5, tol=0.0)), ("jacobi", Jacobi(tol=1e-5)),
                      ("sliding6", Sliding(window=6, tol=1e-5)), ("jacobi_bf16_start", BLOCK_PLANS["jacobi_bf16_start"])):
        out.append((f"fallback/{pname}/b2", "tiny", 2, [4, 4], bp, SamplingSpec(), "half"))
    out.append(("mixed/plain/b3", "tiny", 3, [1, 2, 3], "mixed", SamplingSpec(), None))
    out.append(("mixed/annealed_temp/b3", "tiny", 3, [1, 2, 3], "mixed", SamplingSpec(guidance=CFG), None))
    out.append(("paper_3-4-2-3/plain/b3", "tiny", 3, [1, 2, 3], "paper", SamplingSpec(), None))
    out.append(("demo/sequential/none/b2", "demo", 2, None, None, SamplingSpec(), None))
    out.append(("demo/gs49/none/b2", "demo", 2, None, GSJacobi(segment_len=49, tol=1e-4), SamplingSpec(), None))
    out.append(("demo/jacobi/cfg/b1", "demo", 1, [7], Jacobi(tol=1e-3), SamplingSpec(guidance=Guidance(scale=2.0)), None))
    return out


def plan_for(model, bp) -> Plan | None:
    n, T = len(model.blocks), model.num_tokens
    if bp is None:
        return None
    if bp == "mixed":
        return Plan(n, T, [Jacobi(tol=1e-6), GSJacobi(segment_len=4, tol=1e-6), Sliding(window=5, tol=1e-6), Sequential()])
    if bp == "paper":
        return Plan.from_paper_notation("3-4-2-3", n, T, tol=0.0)
    return Plan.uniform(n, T, bp)


def digest(out) -> dict:
    images = out.images.detach().float().contiguous().cpu()
    stats = [{"block": b.block, "passes": b.passes, "iterations": b.iterations, "fallbacks": b.fallbacks,
              "residual": repr(float(b.residual)), "coarse_passes": b.coarse_passes} for b in out.stats.blocks]
    return {"images": hashlib.sha256(images.numpy().tobytes()).hexdigest(),
            "stats": hashlib.sha256(json.dumps(stats, sort_keys=True).encode()).hexdigest(), "detail": stats}


def run(engine: str) -> dict:
    torch.set_num_threads(1)
    models = {"tiny": make_tiny_model(), "uncond": make_tiny_model(num_classes=0),
              "demo": load_checkpoint("demo").eval()}
    results = {}
    for name, key, batch, labels, bp, spec, bound in cases():
        model = models[key]
        noise = sample_noise(11, range(batch), model.num_tokens, model.token_dim)
        y = None if labels is None else torch.tensor(labels)
        plan = plan_for(model, bp)
        if bound == "half":  # half the largest true value: every parallel segment trips the divergence check
            exact = sample(model, noise, y, spec=spec, engine=engine).images
            plan = Plan(plan.num_blocks, plan.num_tokens, plan.blocks, divergence_bound=0.5 * exact.abs().max().item())
        results[name] = digest(sample(model, noise, y, plan, spec, engine=engine))
    return results


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
