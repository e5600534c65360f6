"""Benchmark: our certified plans vs the public GS-Jacobi code (Liu & Qin, arXiv 2505.12849), on the same
model, noise and labels, measured in one run.

The public code is not part of this repository: `--public DIR` names a checkout of
https://github.com/Minokori/GS-Jacobi_for_TarFlow, whose `GS_Jacobi_sampling.py` is imported from there.
Its `Model` is built with our checkpoint's config and loaded with the same state dict (apple/ml-tarflow's
keys, checked strictly). Before anything is timed, its sequential mode (num_GS 0 on every block) must
reproduce our sequential sampler on one noise vector within 1e-4 (it does to 0.0 on the demo model; 1e-3
under guidance, where rounding alone moves an image that far). No mapping of inputs was needed: both
scale the noise tokens by sqrt(var), flip odd blocks, sample the last forward block first, and guide
with a + g (a - a_uncond) against the mean class embedding, annealed as g t / (T - 1), attn_temp on
the unconditional branch; only the name of the shift differs (our guidance `what` "b" is its "c").

Samplers, per batch size: our sequential; our auto plan at each of `--tols`, scheduled from one profile
made at that batch size (a tolerance whose plan equals another's shares its row); the public code's
configurations. Each is timed on held-out noise in turns (`time_in_turns`, best of `--repeats`), then
sampled once more on the ids 0..`--fid-samples`-1 it has not sampled yet. Columns: wall seconds,
speedup over our sequential, max abs error vs sequential (model space) and the share of 8-bit pixels
that differ (bench/plans.py's map), both over every id sampled, and FID against mnist5k's statistics
(the `mnist5k-classifier` extractor, torch only) of the first `--fid-samples` ids after the same
denoising step for every sampler (`--denoise`, the demo run config's multiplier 1, outside the timer),
with its difference to sequential's, each +- its jackknife standard error as a run's report gives them
(`workflows.fidelity.paired`: the same blocks of ids on both sides, so the difference's error is paired).
Each public configuration is then listed with the plans of ours that dominate it: at least as fast and no
more 8-bit pixels changed.

`--public-configs` takes the paper's [Stack-GS-J-Else] notation (as bench/plans.py's `--hand`), with
`tough` for the block the profile's CRM ranks highest, and `sequential` for num_GS 0 everywhere:
`tough-7-8-10` is the tough block cut into 7 segments of at most 8 Jacobi iterations, every other
block plain Jacobi capped at 10 (num_GS 1). The defaults are our issue's four: Jacobi 10 per block
(`tough-1-10-10`), GS 7x8 + Jacobi 10 (`tough-7-8-10`), GS 14x14 (`tough-14-14-10`) and GS 4x4
(`tough-4-4-10`), read as segments x iterations like the README's GS and J fields. Every block starts
from z (guess 0, the public default) and stops at its default `ebound` (1e-6, which the README's
configurations keep). The public code clamps iterates to +-3, leaves tokens at their start where num_GS
does not divide T (segments of T // num_GS tokens; the bench says so), and, on a model of 8 or more
blocks, runs the 8th block in sampling order differently where its num_GS > 1 (`incre1`); this bench
runs it as it is.

    git clone https://github.com/Minokori/GS-Jacobi_for_TarFlow /tmp/gsj
    python bench/frontier.py --public /tmp/gsj                       # demo model, CPU, batch 1 and 16
    python bench/frontier.py --public /tmp/gsj --batch-sizes 1 --tols 1e-2 --repeats 1 --fid-samples 16 \\
        --calib-images 4 --public-configs tough-7-8-10               # a smoke run
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import torch

from plans import to_uint8  # bench/, beside this script
from tarflow import Guidance, Plan, SamplingSpec, load_checkpoint, model_hash, sample, sample_noise, time_in_turns
from tarflow.data import load_dataset
from tarflow.denoise import denoise
from tarflow.profile import profile_model
from tarflow.schedule import schedule
from workflows.fidelity.extractors import build_extractor, extract
from workflows.fidelity.paired import JACKKNIFE_GROUPS, id_groups, paired_fid
from workflows.fidelity.stats import FeatureStats, FIDStats
from workflows.storage.shards import to_uint8 as pipeline_uint8

HELDOUT_SEED = 10_000  # not the profile's calibration seed (0) nor the scheduler's held-out seed (1)
EXTRACTOR = "mnist5k-classifier"
DEFAULT_CONFIGS = ["tough-1-10-10", "tough-7-8-10", "tough-14-14-10", "tough-4-4-10"]


def load_public(folder: str, model, device):
    """The public code's `Model` with `model`'s config and weights, frozen, on `device`."""
    path = Path(folder) / "GS_Jacobi_sampling.py"
    if not path.is_file():
        raise SystemExit(f"--public {folder}: no GS_Jacobi_sampling.py there (clone "
                         "https://github.com/Minokori/GS-Jacobi_for_TarFlow)")
    spec = importlib.util.spec_from_file_location("gs_jacobi_public", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = model.config
    if c.head_dim != 64 or not c.nvp:
        raise SystemExit(f"the public code builds affine (nvp) blocks with 64-channel heads only; this model has "
                         f"head_dim={c.head_dim}, nvp={c.nvp}")
    public = module.Model(c.in_channels, c.img_size, c.patch_size, c.channels, c.num_blocks, c.layers_per_block,
                          c.num_classes)
    try:
        public.load_state_dict(model.state_dict(), strict=True)
    except RuntimeError as e:
        raise SystemExit(f"the public code's Model does not accept this checkpoint's weights: {e}") from None
    return public.eval().requires_grad_(False).to(device)


def public_lists(config: str, num_blocks: int, num_tokens: int, tough: int) -> tuple[str, dict]:
    """(name, the public `reverse`'s three lists in sampling order) of a `--public-configs` entry."""
    if config == "sequential":
        return "public[sequential]", {"num_GS_list": [0] * num_blocks, "max_jacobi_list": [1] * num_blocks,
                                      "guess_list": [0] * num_blocks}
    notation = config.replace("tough", str(tough))
    Plan.from_paper_notation(notation, num_blocks, num_tokens)  # the project's checks and messages
    fields = notation.split("-")
    stacks, gs, caps = ([int(v) for v in f.split("/")] for f in fields[:3])
    num_gs, max_jacobi = [1] * num_blocks, [int(fields[3])] * num_blocks
    for j, b in enumerate(stacks):
        num_gs[num_blocks - 1 - b] = gs[j if len(gs) > 1 else 0]
        max_jacobi[num_blocks - 1 - b] = caps[j if len(caps) > 1 else 0]
    if any(1 < g < num_tokens and num_tokens % g for g in num_gs):
        print(f"note: in {notation} num_GS does not divide T={num_tokens}: the public code leaves some tokens at "
              "their initial guess")
    return f"public[{notation}]", {"num_GS_list": num_gs, "max_jacobi_list": max_jacobi, "guess_list": [0] * num_blocks}


def public_sampler(public, lists: dict, guidance: Guidance):
    @torch.inference_mode()
    def run(noise, y):
        return public.reverse(noise, y, guidance=guidance.scale, guide_what=guidance.what.replace("b", "c"),
                              attn_temp=guidance.attn_temp, annealed_guidance=guidance.annealed, **lists)
    return run


def check_sequential(model, public, guidance: Guidance) -> None:
    """Exit unless the public code's sequential mode gives our sequential sampler's image for id 0."""
    c = model.config
    spec = SamplingSpec(guidance=guidance, batch_size=1).for_model(c.num_classes)
    device = next(model.parameters()).device
    noise = sample_noise(HELDOUT_SEED, [0], model.num_tokens, model.token_dim, device)
    y = spec.labels_for([0], c.num_classes)
    y = None if y is None else y.to(device)
    lists = public_lists("sequential", len(model.blocks), model.num_tokens, 0)[1]
    err = (sample(model, noise, y, None, spec).images - public_sampler(public, lists, guidance)(noise, y)).abs().max()
    # guided sampling amplifies rounding further: on the demo model at guidance 3 our own image of one id moves
    # up to 1e-3 between batch 1 and batch 8, about what the public code's two forwards (ours: one over 2B) give
    tol = 1e-3 if guidance.active else 1e-4
    if not err <= tol:
        raise SystemExit(f"the public code's sequential mode lands {err:.1e} from ours (max abs, one image; "
                         f"allowed {tol:g}): the models differ, so its timings would not be of the same map")
    print(f"public sequential mode vs ours on id 0: max abs {err:.1e}")


def fid_groups(extractor, images: torch.Tensor, groups: int) -> list[FeatureStats]:
    """mnist5k-classifier statistics of model-space images (ids 0..N-1, mapped to 8 bits as the pipeline stores
    samples) in the jackknife's groups of ids, as a run's paired FID keeps them (`fidelity.paired`)."""
    pixels = pipeline_uint8(images.cpu().numpy())
    features = np.concatenate([extract(extractor, pixels[s:s + 1000])[0] for s in range(0, len(pixels), 1000)])
    group = id_groups(np.arange(len(pixels)), len(pixels), groups)
    return [FeatureStats.of(features[group == k]) for k in range(groups)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--public", required=True, help="folder of a checkout of the public GS-Jacobi code")
    ap.add_argument("--checkpoint", default="demo", help="model path, or 'demo' for the shipped demo model")
    ap.add_argument("--data", default="mnist5k", help="calibration images (dataset name or folder)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--tols", type=float, nargs="+", default=[1e-3, 1e-2, 5e-2, 2e-1],
                    help="tolerances of our auto plans (max abs deviation from sequential, model space)")
    ap.add_argument("--public-configs", nargs="+", default=DEFAULT_CONFIGS,
                    help="the public code's configurations, Stack-GS-J-Else with 'tough' for the highest-CRM "
                         "block, or 'sequential'")
    ap.add_argument("--num-images", type=int, default=16, help="timed held-out images per batch size (whole batches)")
    ap.add_argument("--fid-samples", type=int, default=256, help="images per sampler for FID (0: no FID)")
    ap.add_argument("--denoise", type=float, default=1.0,
                    help="denoising step multiplier applied to every sampler's images before FID (0: none)")
    ap.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance scale")
    ap.add_argument("--calib-images", type=int, default=8, help="calibration images for the profile")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.fid_samples == 1:
        raise SystemExit("--fid-samples: 0 (off) or at least 2 (a covariance needs two images)")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, provenance = load_checkpoint(args.checkpoint, with_metadata=True)
    model = model.eval().to(device)
    public = load_public(args.public, model, device)
    c = model.config
    T, D, num_blocks = model.num_tokens, model.token_dim, len(model.blocks)
    noise_std = provenance.get("noise_std")
    if args.fid_samples and (c.in_channels, c.img_size) != (1, 28):
        raise SystemExit("FID compares with mnist5k digits through their classifier: 28x28 greyscale models only "
                         "(or --fid-samples 0)")
    if args.fid_samples and args.denoise and noise_std is None:
        raise SystemExit("the checkpoint records no training noise_std for the denoising step: --denoise 0")
    print(f"model {args.checkpoint}: {num_blocks} blocks x {T} tokens, device {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; public code {args.public}")

    guidance = Guidance(scale=args.guidance)
    check_sequential(model, public, guidance)
    bound = model_hash(model)
    reference = extractor = None
    if args.fid_samples:
        extractor = build_extractor(EXTRACTOR)
        [everything] = fid_groups(extractor, load_dataset("mnist5k").images, 1)
        reference = FIDStats.from_features(everything, EXTRACTOR, (c.img_size, c.img_size), "mnist5k")
    results = []
    for B in args.batch_sizes:
        spec = SamplingSpec(guidance=guidance, batch_size=B).for_model(c.num_classes)
        t0 = time.perf_counter()
        prof = profile_model(model, spec, data=args.data, num_images=max(args.calib_images, B), device=args.device)
        shares = [b.crm_share for b in prof.blocks]
        tough = max(range(num_blocks), key=shares.__getitem__)
        t1 = time.perf_counter()
        ours = {"sequential": Plan.sequential(num_blocks, T)}
        for tol in args.tols:
            ours[f"auto[{tol:g}]"] = schedule(prof, model, tol=tol, device=device)
        print(f"\nbatch {B}: profile {t1 - t0:.1f}s, {len(args.tols)} plans {time.perf_counter() - t1:.1f}s; "
              "CRM shares " + " ".join(f"{100 * s:.0f}%" for s in shares) + f" (tough block {tough})")
        for name, plan in list(ours.items())[1:]:
            print(f"{name}: {plan.summary()}")
        groups = {}  # one row per distinct plan: equal plans would time the same code twice
        for name, plan in ours.items():
            groups.setdefault(plan.bound_to(bound).fingerprint(), []).append(name)
        samplers = {" = ".join(names): lambda x, y, p=ours[names[0]]: sample(model, x, y, p, spec).images
                    for names in groups.values()}
        summaries = {" = ".join(names): ours[names[0]].summary() for names in groups.values()}
        base = next(iter(samplers))  # sequential's row
        configs = dict(public_lists(cfg, num_blocks, T, tough) for cfg in args.public_configs)
        samplers.update({name: public_sampler(public, lists, guidance) for name, lists in configs.items()})

        n = max(B, args.num_images // B * B)
        ids = range(max(n, args.fid_samples))
        noise = sample_noise(HELDOUT_SEED, ids, T, D, device)
        labels = spec.labels_for(ids, c.num_classes)
        labels = None if labels is None else labels.to(device)

        def labels_at(s, e):
            return None if labels is None else labels[s:e]

        timed = time_in_turns(model, noise[:n], labels_at(0, n), samplers, args.repeats, spec)
        images = {name: torch.cat(outs + [samplers[name](noise[s:s + B], labels_at(s, s + B))
                                          for s in range(n, len(ids), B)]) for name, (outs, _) in timed.items()}
        ref, ref_s, ref8 = images[base], timed[base][1], to_uint8(images[base])
        rows, groups = {}, {}
        for name, x in images.items():
            rows[name] = {"batch_size": B, "run": name, **({"plan": summaries[name]} if name in summaries
                                                           else configs[name]),
                          "seconds": timed[name][1], "speedup": ref_s / timed[name][1],
                          "max_abs_error": (x - ref).abs().max().item(),
                          "pixels_8bit_changed": (to_uint8(x) != ref8).float().mean().item(), "fid": None}
            if reference is not None:
                x, y = x[:args.fid_samples], labels_at(0, args.fid_samples)
                if args.denoise:
                    x = denoise(model, x, y, noise_std=noise_std, lr_multiplier=args.denoise)
                groups[name] = fid_groups(extractor, x, min(JACKKNIFE_GROUPS, args.fid_samples))
        for name, row in rows.items():  # each FID beside sequential's on the same ids, with the jackknife's errors
            if groups:
                d = paired_fid(groups[name], groups[base], reference, (c.img_size, c.img_size))
                row.update(fid=d.fid_plan, fid_se=d.plan_se, fid_minus_sequential=d.difference,
                           difference_se=d.difference_se)
        for name in configs:
            rows[name]["dominated_by"] = [o for o in summaries if rows[o]["seconds"] <= rows[name]["seconds"]
                                          and rows[o]["pixels_8bit_changed"] <= rows[name]["pixels_8bit_changed"]]

        fid_note = "" if reference is None else f", FID of ids 0..{args.fid_samples - 1} vs mnist5k" + \
            (f" after denoising x{args.denoise:g}" if args.denoise else "")
        print(f"\nbatch {B}: {n} timed images (best of {args.repeats}), errors over ids 0..{len(ids) - 1}{fid_note}\n")
        print("| run | seconds | x sequential | max abs | 8-bit pixels changed | FID | FID - sequential's |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in rows.values():
            fid = "- | -" if r["fid"] is None else (f"{r['fid']:.2f} +- {r['fid_se']:.2f} | "
                                                    f"{r['fid_minus_sequential']:+.3f} +- {r['difference_se']:.3f}")
            print(f"| {r['run']} | {r['seconds']:.3f} | {r['speedup']:.2f}x | {r['max_abs_error']:.1e} | "
                  f"{100 * r['pixels_8bit_changed']:.2f}% | {fid} |")
        print()
        for name in configs:
            print(f"{name}: " + (f"dominated by {', '.join(rows[name]['dominated_by'])}"
                                 if rows[name]["dominated_by"] else "not dominated"))
        results.extend(rows.values())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
