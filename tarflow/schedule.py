"""Scheduler: from a profile, the fastest plan that stays within a tolerance of sequential sampling.

Per block the candidates are sequential sampling and every block plan the profile ran
(Jacobi, GS-Jacobi segment lengths, sliding windows; z or zeros start; stopping tolerances
and fixed iteration caps). A candidate's predicted time is its measured passes times the
measured seconds per pass on the profiled device and batch size; sequential is (T-1)
measured steps. Only candidates predicted faster than sequential and more accurate than
every faster one are kept, so a block where nothing parallel beats sequential on this
hardware stays sequential and the plan is never predicted slower than sequential.

Per-block errors measured on a few calibration images do not bound the final error: a
block's error varies ~10x between samples, an error in a block sampled early is carried
(on the demo model up to 2.5x larger) through every later block, and the blocks'
errors add up. So choices are made by sampling, not by adding per-block errors:
blocks are decided one at a time (highest CRM first), each taking its
fastest candidate for which the whole plan so far stays within its share of the
error target (block k of n may bring the final error to k/n of the target), found by
bisection over its candidates. The check samples the calibration noise and a
held-out noise batch under the profile's sampling spec (the map generation samples),
plan vs sequential, max abs difference of final images in model space; the target is
half the tolerance, a margin for noise the calibration never saw. Predicted times come
from the profile, so the final plan races sequential sampling on the held-out batch (in
turns, best of a few) and must come out at least MIN_GAIN faster, or the plan is
sequential everywhere: never slower, as measured, not only as predicted.
CRM and IGM are the paper's priors: they are reported per block beside the measured
choice, CRM orders the blocks and IGM breaks near-ties between candidates (lower IGM
start first).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .checkpoint import model_hash
from .model import Model
from .noise import sample_noise
from .plan import BlockPlan, Plan, Sequential
from .calibration import NO_DATA, calibration_batch
from .profile import BlockProfile, Profile, ProfileError
from .sampling import sample, time_in_turns

TIE_FRACTION = 0.03  # candidates within 3% of sequential's predicted time are not worth any error
MIN_GAIN = 0.1  # a parallel plan must time at least 10% faster than sequential, or sequential it is
CONFIRM_REPEATS = 3
MAX_ROUNDS = 48  # verifications in all; each block's bisection needs about log2(candidates) + 1
# the worst of a few calibration images underestimates the worst of many: verify at half the tolerance,
# on the calibration noise and on at least MIN_HOLDOUT held-out images (fixed iteration caps, unlike
# stopping tolerances, do not adapt to a hard sample, so their errors have long tails)
VERIFY_MARGIN = 0.5
MIN_HOLDOUT = 16


@dataclass
class Option:
    plan: BlockPlan
    passes: float
    error: float  # max abs vs the block's true solution on the calibration batch
    predicted_seconds: float


def block_options(b: BlockProfile, num_tokens: int) -> list[Option]:
    """Sequential first, then every block plan the profile measured."""
    seq = Option(Sequential(), num_tokens - 1, b.sequential_error, (num_tokens - 1) * b.sequential_step_seconds)
    return [seq] + [Option(r.plan, r.passes, r.error, r.passes * b.pass_seconds[r.plan.segment_length(num_tokens)])
                    for r in b.convergence]


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
    """The auto plan for `model` from its `profile` (see the module docstring), verified and raced
    on `device` (default: where the model is; the model is moved there).

    `tol` bounds the max abs deviation of final images (model space) from sequential
    sampling under the profile's spec, on the calibration noise and on a held-out batch of
    `holdout_images` (default: the calibration size, at least MIN_HOLDOUT; whole batches),
    seeded `holdout_seed` (default: the calibration seed + 1)."""
    if isinstance(tol, bool) or not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol={tol!r}: must be a finite number > 0")
    profile.check_model(model)
    if (len(model.blocks), model.num_tokens) != (profile.num_blocks, profile.num_tokens):
        raise ProfileError(f"the profile is for {profile.num_blocks} blocks x {profile.num_tokens} tokens")
    spec, T = profile.spec, profile.num_tokens
    B = spec.batch_size
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device)
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
        return Plan(profile.num_blocks, T, [p.plan for p in picks], model_hash=profile.model_hash, name="auto")

    def verify(picks: list[Option], block: int, limit: float) -> dict:
        plan = plan_of(picks)
        errors, seconds = {}, {}
        for k, (n, y) in batches.items():
            _, seconds[k], errors[k] = _sample_chunks(model, n, y, plan, spec, reference[k][0], limit)
            if errors[k] > limit:
                break  # failed: the rest would only cost time
        rnd = {"block": block, "plan": plan.summary(), "final_error": errors, "seconds": seconds, "limit": limit,
               "passed": max(errors.values()) <= limit}
        rounds.append(rnd)
        return rnd

    seq_options = [block_options(b, T)[0] for b in profile.blocks]
    picks = list(seq_options)
    cands = {b.block: candidates(b, T) for b in profile.blocks}
    active = [b for b in profile.blocks if cands[b.block]]
    # the paper's prior decides the order: toughest (highest CRM) first. A tough block is the likeliest
    # to stay sequential, and then its share of the error target passes on to the simpler blocks
    active.sort(key=lambda b: -b.crm)
    accepted = None  # the round that verified the current picks
    for k, b in enumerate(active, start=1):
        limit = target * k / len(active)
        options = cands[b.block]
        # bisection for the fastest passing option; index len(options) (sequential) passes already
        lo, hi, probe = -1, len(options), 0
        while hi - lo > 1 and len(rounds) < MAX_ROUNDS:
            trial = list(picks)
            trial[b.block] = options[probe]
            rnd = verify(trial, b.block, limit)
            if rnd["passed"]:
                hi, best_round = probe, rnd
            else:
                lo = probe
            probe = (lo + hi) // 2
        if hi < len(options):
            picks[b.block] = options[hi]
            accepted = best_round
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
        "decision_order": [b.block for b in active],
    }
    return plan


def _option_dict(o: Option) -> dict:
    return {**asdict(o), "plan": o.plan.short()}


def hand_plan(notation: str, model: Model, guess: list[int] | None = None, tol: float = 0.0) -> Plan:
    """A paper-style plan (`7-8-32-10`, see Plan.from_paper_notation) bound to `model`."""
    plan = Plan.from_paper_notation(notation, len(model.blocks), model.num_tokens, guess, tol)
    return plan.bound_to(model_hash(model))
