"""Scheduler: from a profile, the fastest plan that stays within a tolerance of sequential sampling.

Per block the candidates are sequential sampling and every block plan the profile ran, each
predicted at its measured passes times the measured seconds per pass; only those predicted faster
than sequential and more accurate than every faster one are kept, so a block where nothing parallel
pays on this hardware stays sequential. Per-block errors on a few calibration images do not bound
the final error (they vary between samples, are carried through later blocks and add up: figures
in docs/benchmarks.md), so they only rank choices and sampling decides: the error budget is spent
where time is cheapest to buy (`spend_budget`) for a bisected guess of how block errors grow into
final error, then single blocks move faster while the plan still passes. A check samples the
calibration noise and a held-out batch, plan vs sequential, and holds the final images' max abs
difference (model space) to half the tolerance. The plan then races sequential sampling and must be
MIN_GAIN faster as measured, or it is sequential everywhere. CRM and IGM, the paper's priors, are
reported per block beside the choice; IGM breaks near-ties (lower IGM start first).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .checkpoint import model_hash
from .model import Model
from .noise import sample_noise
from .plan import BlockPlan, Plan, check_tolerance
from .solvers import EXACT
from .calibration import NO_DATA, calibration_batch
from .profile import BlockProfile, Profile, ProfileError, model_on, profile_model
from .sampling import sample, time_in_turns

TIE_FRACTION = 0.03  # candidates within 3% of sequential's predicted time are not worth any error
MIN_GAIN = 0.1  # a parallel plan must time at least 10% faster than sequential, or sequential it is
CONFIRM_REPEATS = 3
MAX_ROUNDS = 48  # verifications in all: ~5 to bisect the error growth, then single-block steps
# the worst of a few calibration images underestimates the worst of many: verify at half the tolerance,
# on the calibration noise and on at least MIN_HOLDOUT held-out images (fixed iteration caps, unlike
# stopping tolerances, do not adapt to a hard sample, so their errors have long tails)
VERIFY_MARGIN = 0.5
MIN_HOLDOUT = 16
HOPELESS = 2.0


@dataclass
class Option:
    plan: BlockPlan
    passes: float
    error: float  # max abs vs the block's true solution on the calibration batch
    predicted_seconds: float


def block_options(b: BlockProfile, num_tokens: int) -> list[Option]:
    """Sequential first, then every block plan the profile measured."""
    seq = Option(EXACT, num_tokens - 1, b.sequential_error, (num_tokens - 1) * b.sequential_step_seconds)
    def seconds(r) -> float:
        L = r.plan.segment_length(num_tokens)
        return (r.passes - r.coarse_passes) * b.pass_seconds[L] + r.coarse_passes * b.coarse_pass_seconds.get(L, 0.0)
    return [seq] + [Option(r.plan, r.passes, r.error, seconds(r)) for r in b.convergence]


def candidates(b: BlockProfile, num_tokens: int) -> list[Option]:
    """The block's options worth trying, fastest first: predicted faster than sequential (by more
    than TIE_FRACTION) and more accurate than every faster one. Near-equal times: lower IGM first."""
    seq, *options = block_options(b, num_tokens)
    fast = [o for o in options if o.predicted_seconds < seq.predicted_seconds * (1 - TIE_FRACTION)]
    out, best = [], math.inf
    for o in sorted(fast, key=lambda o: (o.predicted_seconds, b.igm[o.plan.init], o.error)):
        if o.error < best:
            out.append(o)
            best = o.error
    return out


def _sample_chunks(model, noise, labels, plan, spec, reference=None, limit=math.inf):
    """(images, wall seconds, max abs error vs `reference`), sampling in batches of the spec's batch
    size. Stops after the first batch whose error exceeds `limit`: the plan has failed already."""
    B = spec.batch_size
    images, seconds, error = [], 0.0, 0.0
    for s in range(0, noise.shape[0], B):
        y = None if labels is None else labels[s:s + B]
        out = sample(model, noise[s:s + B], y, plan, spec)
        images.append(out.images)
        seconds += out.stats.seconds
        if reference is not None:
            error = max(error, (images[-1] - reference[s:s + B]).abs().max().item())
            if error > limit:
                break
    return torch.cat(images), seconds, error


def schedule(profile: Profile, model: Model, tol: float = 1e-3, holdout_seed: int | None = None,
             holdout_images: int | None = None, device=None) -> Plan:
    """The auto plan for `model` from its `profile` (see the module docstring).

    Args:
        profile: the model's profile (its spec is the one the plan is certified for).
        model: the model profiled.
        tol: the max abs deviation of final images (model space) from sequential sampling under the
            profile's spec, on the calibration noise and on a held-out batch (`check_tolerance`).
        holdout_seed: the held-out noise's seed (default: the calibration seed + 1).
        holdout_images: held-out images (default: the calibration size, at least MIN_HOLDOUT; whole batches).
        device: where plans are verified and raced (default: where the model is; a copy of the model where
            it lives elsewhere).

    Returns:
        Plan: certified for `tol` and the profile's spec, with the evidence of every choice; sequential
        everywhere where no parallel plan passes or times MIN_GAIN faster.
    """
    check_tolerance(tol)
    profile.check_model(model)
    if (len(model.blocks), model.num_tokens) != (profile.num_blocks, profile.num_tokens):
        raise ProfileError(f"the profile is for {profile.num_blocks} blocks x {profile.num_tokens} tokens")
    spec, T = profile.spec, profile.num_tokens
    B = spec.batch_size
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model_on(model, device)
    cal = profile.calibration
    conditional = spec.labels != "none"
    calib = calibration_batch(model, None if cal.source == NO_DATA else cal.source, cal.num_images, cal.seed,
                              conditional)
    held_seed = cal.seed + 1 if holdout_seed is None else holdout_seed
    n_held = max(cal.num_images, MIN_HOLDOUT) if holdout_images is None else holdout_images
    if n_held < 1:
        raise ValueError(f"holdout_images={holdout_images}: must be >= 1")
    n_held = -(-n_held // B) * B
    held_noise = sample_noise(held_seed, range(n_held), T, model.token_dim)
    held_labels = None
    if calib.labels is not None:
        held_labels = torch.randint(model.config.num_classes, (n_held,),
                                    generator=torch.Generator().manual_seed(held_seed))

    def on_device(t):
        return None if t is None else t.to(device)

    batches = {"calibration": (on_device(calib.noise), on_device(calib.labels)),
               "held_out": (on_device(held_noise), on_device(held_labels))}
    sequential = Plan.sequential(profile.num_blocks, T)
    reference = {k: _sample_chunks(model, n, y, sequential, spec) for k, (n, y) in batches.items()}

    target = tol * VERIFY_MARGIN
    rounds: list[dict] = []

    def plan_of(picks: list[Option]) -> Plan:
        blocks = [_with_check_every(p, T) for p in picks]
        return Plan(profile.num_blocks, T, blocks, model_hash=profile.model_hash, name="auto")

    def verify(picks: list[Option], why: str) -> dict:
        plan = plan_of(picks)
        errors, seconds = {}, {}
        for k, (n, y) in batches.items():
            _, seconds[k], errors[k] = _sample_chunks(model, n, y, plan, spec, reference[k][0], target)
            if errors[k] > target:
                break  # failed: the rest would only cost time
        rnd = {"why": why, "plan": plan.summary(), "final_error": errors, "seconds": seconds, "limit": target,
               "predicted_seconds": sum(p.predicted_seconds for p in picks),
               "block_errors": sum(p.error for p in picks), "passed": max(errors.values()) <= target}
        rounds.append(rnd)
        return rnd

    seq_options = [block_options(b, T)[0] for b in profile.blocks]
    cands = {b.block: candidates(b, T) for b in profile.blocks}
    # each block's ladder, fastest first, ending in sequential: every step costs time and buys accuracy
    ladders = [cands[b.block] + [seq_options[b.block]] for b in profile.blocks]
    tried: dict[tuple, dict] = {}

    def attempt(picks: list[Option], why: str) -> dict:
        key = tuple(id(p) for p in picks)
        if key not in tried:
            tried[key] = verify(picks, why)
        return tried[key]

    # 1. the amplification from block errors to final error is unknown (a few calibration images, errors
    # carried through later blocks): bisect it on a ladder, each choice the knapsack's for that factor
    scales = [2.0 ** k for k in range(-3, 15)]
    lo, hi = -1, len(scales)  # the choice at scales[hi] passes; beyond the ladder: sequential everywhere
    accepted, best = None, list(seq_options)
    while hi - lo > 1 and len(rounds) < MAX_ROUNDS:
        mid = (lo + hi) // 2
        picks = spend_budget(ladders, target / scales[mid])
        if all(p is s for p, s in zip(picks, seq_options)):
            hi = mid  # nothing parallel fits: sequential, exact, passes without sampling
            continue
        rnd = attempt(picks, f"budget: block errors <= {target / scales[mid]:.2g}")
        if rnd["passed"]:
            hi, accepted, best = mid, rnd, picks
        else:
            lo = mid
    # 2. one factor for all blocks is a guess: a block whose errors grow far more than the others' (on the
    # demo, the block sampled first) fails every choice that includes it. From the bisection's plan, or
    # from sequential everywhere if none passed, move single blocks one step up their ladders, most time
    # saved first (doubling a block's stride while its steps pass), keeping each step that still passes.
    # A step whose block error alone exceeds HOPELESS x the target is not tried (an error passes on at
    # least ~1x)
    jump = [1] * len(ladders)  # rungs to try at once per block: doubled after each step that passes
    improved = True
    while improved and len(rounds) < MAX_ROUNDS:
        improved = False
        steps = []
        for i, ladder in enumerate(ladders):
            j = ladder.index(best[i])
            k = next((k for k in range(max(j - jump[i], 0), j) if ladder[k].error <= HOPELESS * target), None)
            if k is not None:
                steps.append((best[i].predicted_seconds - ladder[k].predicted_seconds, i, ladder[k]))
        for _, i, faster in sorted(steps, key=lambda s: -s[0]):
            if len(rounds) >= MAX_ROUNDS:
                break
            trial = list(best)
            trial[i] = faster
            rnd = attempt(trial, f"block {i} faster")
            if rnd["passed"]:
                best, accepted, improved = trial, rnd, True
                jump[i] *= 2
                break
            if jump[i] > 1:
                jump[i], improved = 1, True  # a shorter step may still pass
            else:
                ladders[i] = ladders[i][ladders[i].index(best[i]):]  # nothing faster for this block
    picks = best
    fallback, measured = None, None
    if accepted:
        # the profile predicts; a clock decides. Time the plan against sequential in turns on the
        # held-out batch: a plan that is not clearly faster here is not worth its error
        raced = time_in_turns(model, *batches["held_out"], {"sequential": sequential, "plan": plan_of(picks)},
                              CONFIRM_REPEATS, spec)
        measured = {"plan": raced["plan"][1], "sequential": raced["sequential"][1], "repeats": CONFIRM_REPEATS}
        if measured["plan"] > (1 - MIN_GAIN) * measured["sequential"]:
            fallback = (f"measured {measured['sequential'] / measured['plan']:.2f}x over sequential on this device, "
                        f"below the {1 / (1 - MIN_GAIN):.2f}x a parallel plan must reach")
            picks, accepted = list(seq_options), None  # exact, and never slower than itself
    plan = plan_of(picks)
    seq_pred = sum((T - 1) * b.sequential_step_seconds for b in profile.blocks)
    plan_pred = sum(p.predicted_seconds for p in picks)
    plan.tol, plan.spec = float(tol), spec
    plan.evidence = {
        "profile": {"model_hash": profile.model_hash, "device": profile.device, "batch_size": B,
                    "calibration": asdict(cal), "torch_version": profile.torch_version},
        "verified_on": str(device),
        "predicted_seconds": {"plan": plan_pred, "sequential": seq_pred, "speedup": seq_pred / plan_pred},
        "measured_seconds": measured,  # best of CONFIRM_REPEATS on the held-out batch; None: not raced
        "final_error": accepted["final_error"] if accepted else {k: 0.0 for k in batches},
        "fallback": fallback,
        "rounds": rounds,
        "blocks": [{"block": b.block, "crm": b.crm, "crm_share": b.crm_share, "igm": b.igm,
                    "chosen": _option_dict(p), "sequential_seconds": (T - 1) * b.sequential_step_seconds,
                    "candidates": [_option_dict(o) for o in cands[b.block]]} for b, p in zip(profile.blocks, picks)],
    }
    return plan


def spend_budget(ladders: list[list[Option]], budget: float) -> list[Option]:
    """One option per block (from ladders ordered fastest first, each step more accurate) with summed
    block errors <= budget (as near as the ladders allow) and the least predicted time: from the fastest
    option everywhere, repeatedly take the step that buys the most accuracy per second paid (the greedy
    for a multiple-choice knapsack). So the budget goes where time is cheapest to buy, not in equal
    shares."""
    at = [0] * len(ladders)
    while sum(ladder[j].error for ladder, j in zip(ladders, at)) > budget:
        steps = []
        for i, (ladder, j) in enumerate(zip(ladders, at)):
            if j + 1 < len(ladder):
                gained = ladder[j].error - ladder[j + 1].error
                paid = max(ladder[j + 1].predicted_seconds - ladder[j].predicted_seconds, 1e-12)
                steps.append((gained / paid if gained > 0 else 0.0, i))
        if not steps:
            break
        at[max(steps)[1]] += 1
    return [ladder[j] for ladder, j in zip(ladders, at)]


def _with_check_every(o: Option, num_tokens: int) -> BlockPlan:
    """The option's block plan reading device-side flags about 4 times per segment's measured
    iterations (a quarter of them is the most a segment can waste after converging)."""
    bp = o.plan
    return bp.reading_every(max(1, int(o.passes / len(bp.segments(num_tokens)) / 4)))


def _option_dict(o: Option) -> dict:
    return {**asdict(o), "plan": o.plan.short()}


def hand_plan(notation: str, model: Model, guess: list[int] | None = None, tol: float = 0.0) -> Plan:
    """A paper-style plan (`7-8-32-10`, see Plan.from_paper_notation) bound to `model`."""
    plan = Plan.from_paper_notation(notation, len(model.blocks), model.num_tokens, guess, tol)
    return plan.bound_to(model_hash(model))


def auto_plan(model: Model, spec, tol: float = 1e-3, data: str | None = None, num_images: int = 8,
              device: str = "cpu", **profile_options) -> tuple[Plan, Profile]:
    """Profile `model` under `spec` and schedule its auto plan, in this process with torch alone (what
    the profile and plan stages do in Ray tasks).

    Args:
        model: the TarFlow model.
        spec: the sampling spec the plan is certified for (made concrete: `spec.for_model`).
        tol: the max abs deviation of final images from sequential sampling the plan is certified for.
        data: calibration images (a dataset name or path); None: the model's own samples.
        num_images: calibration images.
        device: where to profile and verify.
        **profile_options: to `profile.profile_model` (segment_lens, windows, tols, caps, repeats, costs).

    Returns:
        (plan, profile).
    """
    prof = profile_model(model, spec, data=data, num_images=num_images, device=device, **profile_options)
    return schedule(prof, model, tol=tol, device=device), prof
