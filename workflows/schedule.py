"""Scheduler: from a profile, the fastest plan that stays within a tolerance of sequential sampling.

Per block the candidates are sequential sampling and every solver setting the profile
ran (Jacobi, GS-Jacobi segment lengths, sliding windows; z or zeros start; stopping
tolerances and fixed iteration caps). A candidate's predicted time is its measured
passes times the measured seconds per pass on the profiled device and batch size;
sequential is (T-1) measured steps. Only candidates predicted faster than sequential
and more accurate than every faster one are kept, so a block where nothing parallel
beats sequential on this hardware stays sequential and the plan is never predicted
slower than sequential.

Per-block errors measured on a few calibration images do not bound the final error: a
block's error varies ~10x between samples, an error in a block sampled early is carried
(on the demo model up to 2.5x larger) through every later block, and the blocks'
errors add up. So choices are made by sampling, not by adding per-block errors:
blocks are decided one at a time (highest CRM first), each taking its
fastest candidate for which the whole plan so far stays within its share of the
error target (block k of n may bring the final error to k/n of the target), found by
bisection over its candidates. The check samples the calibration noise and a
held-out noise batch, plan vs sequential, max abs difference of final images in model
space; the target is half the tolerance, a margin for noise the calibration never saw.
Predicted times come from the profile, so the final plan races sequential sampling on
the held-out batch (in turns, best of a few) and must come out at least MIN_GAIN
faster, or the plan is sequential everywhere: never slower, as measured, not only as
predicted.
CRM and IGM are the paper's priors: they are reported per block beside the measured
choice, CRM orders the blocks and IGM breaks near-ties between candidates (lower IGM
start first).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from tarflow import Model, Plan, model_hash, sample
from tarflow.noise import sample_noise
from tarflow.plan import BlockPlan

from .compare import time_in_turns
from .profile import BlockProfile, Profile, ProfileError, calibration_batch

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
    solver: str
    segment_len: int | None
    init: str
    tol: float
    passes: float
    error: float  # max abs vs the block's true solution on the calibration batch
    predicted_seconds: float
    cap: int | None = None  # iterations per segment (BlockPlan.max_iters)

    def block_plan(self) -> BlockPlan:
        return BlockPlan(self.solver, self.segment_len, self.cap, self.tol, self.init)


def block_options(b: BlockProfile, num_tokens: int) -> list[Option]:
    seq = Option("sequential", None, "z", 0.0, num_tokens - 1, b.sequential_error,
                 (num_tokens - 1) * b.sequential_step_seconds)
    return [seq] + [Option(r.solver, None if r.solver == "jacobi" else r.segment_len, r.init, r.tol, r.passes,
                           r.error, r.passes * b.pass_seconds[str(r.segment_len)], r.cap) for r in b.convergence]


def candidates(b: BlockProfile, num_tokens: int) -> list[Option]:
    """The block's options worth trying, fastest first: predicted faster than sequential (by more
    than TIE_FRACTION) and more accurate than every faster one. Near-equal times: lower IGM first."""
    seq, *options = block_options(b, num_tokens)
    fast = [o for o in options if o.predicted_seconds < seq.predicted_seconds * (1 - TIE_FRACTION)]
    out, best = [], math.inf
    for o in sorted(fast, key=lambda o: (o.predicted_seconds, b.igm[o.init], o.error)):
        if o.error < best:
            out.append(o)
            best = o.error
    return out


def _sample_chunks(model, noise, labels, plan, guidance, batch_size, reference=None, limit=math.inf):
    """(images, wall seconds, max abs error vs `reference`), sampling in batches of the plan's batch
    size. Stops after the first batch whose error exceeds `limit`: the plan has failed already."""
    images, seconds, error = [], 0.0, 0.0
    for s in range(0, noise.shape[0], batch_size):
        y = None if labels is None else labels[s:s + batch_size]
        t0 = time.perf_counter()
        images.append(sample(model, noise[s:s + batch_size], y, plan, guidance=guidance).images)
        seconds += time.perf_counter() - t0
        if reference is not None:
            error = max(error, (images[-1] - reference[s:s + batch_size]).abs().max().item())
            if error > limit:
                break
    return torch.cat(images), seconds, error


def schedule(profile: Profile, model: Model, tol: float = 1e-3, guidance: float | None = None,
             holdout_seed: int | None = None, holdout_images: int | None = None) -> Plan:
    """The auto plan for `model` from its `profile` (see the module docstring).

    `tol` bounds the max abs deviation of final images (model space) from sequential
    sampling on the calibration noise and on a held-out batch of `holdout_images`
    (default: the calibration size, at least MIN_HOLDOUT; whole batches), seeded
    `holdout_seed` (default: the calibration seed + 1)."""
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol={tol!r}: must be a finite number > 0")
    if model_hash(model) != profile.model_hash:
        raise ProfileError(f"the profile was made for model {profile.model_hash}, this model is {model_hash(model)}")
    if (len(model.blocks), model.num_tokens) != (profile.num_blocks, profile.num_tokens):
        raise ProfileError(f"the profile is for {profile.num_blocks} blocks x {profile.num_tokens} tokens")
    case = profile.case(profile.cases[0].guidance if guidance is None else guidance)
    T, B = profile.num_tokens, profile.batch_size
    cal = profile.calibration
    calib = calibration_batch(model, None if cal["source"] == "samples" else cal["source"], cal["num_images"],
                              cal["seed"])
    held_seed = cal["seed"] + 1 if holdout_seed is None else holdout_seed
    n_held = max(cal["num_images"], MIN_HOLDOUT) if holdout_images is None else holdout_images
    if n_held < 1:
        raise ValueError(f"holdout_images={holdout_images}: must be >= 1")
    n_held = -(-n_held // B) * B
    held_noise = sample_noise(held_seed, range(n_held), T, model.token_dim)
    held_labels = None
    if calib.labels is not None:
        held_labels = torch.randint(model.config.num_classes, (n_held,),
                                    generator=torch.Generator().manual_seed(held_seed))
    batches = {"calibration": (calib.noise, calib.labels), "held_out": (held_noise, held_labels)}
    sequential = Plan.sequential(profile.num_blocks, T)
    reference = {k: _sample_chunks(model, n, y, sequential, case.guidance, B) for k, (n, y) in batches.items()}

    target = tol * VERIFY_MARGIN
    rounds: list[dict] = []

    def plan_of(picks: list[Option]) -> Plan:
        return Plan(profile.num_blocks, T, [p.block_plan() for p in picks], model_hash=profile.model_hash,
                    name="auto").validate()

    def verify(picks: list[Option], block: int, limit: float) -> dict:
        plan = plan_of(picks)
        errors, seconds = {}, {}
        for k, (n, y) in batches.items():
            _, seconds[k], errors[k] = _sample_chunks(model, n, y, plan, case.guidance, B, reference[k][0], limit)
            if errors[k] > limit:
                break  # failed: the rest would only cost time
        rnd = {"block": block, "plan": plan.summary(), "final_error": errors, "seconds": seconds, "limit": limit,
               "passed": max(errors.values()) <= limit}
        rounds.append(rnd)
        return rnd

    seq_options = [block_options(b, T)[0] for b in case.blocks]
    picks = list(seq_options)
    cands = {b.block: candidates(b, T) for b in case.blocks}
    active = [b for b in case.blocks if cands[b.block]]
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
                              CONFIRM_REPEATS, B, guidance=case.guidance)
        measured = {"plan": raced["plan"][1], "sequential": raced["sequential"][1], "repeats": CONFIRM_REPEATS}
        if measured["plan"] > (1 - MIN_GAIN) * measured["sequential"]:
            fallback = (f"measured {measured['sequential'] / measured['plan']:.2f}x over sequential on this device, "
                        f"below the {1 / (1 - MIN_GAIN):.2f}x a parallel plan must reach")
            picks, accepted = list(seq_options), None  # exact, and never slower than itself
    plan = plan_of(picks)
    seq_pred = sum((T - 1) * b.sequential_step_seconds for b in case.blocks)
    plan_pred = sum(p.predicted_seconds for p in picks)
    plan.evidence = {
        "profile": {"model_hash": profile.model_hash, "device": profile.device, "batch_size": B,
                    "calibration": cal, "torch_version": profile.torch_version},
        "guidance": case.guidance,
        "tol": tol,
        "predicted_seconds": {"plan": plan_pred, "sequential": seq_pred, "speedup": seq_pred / plan_pred},
        "measured_seconds": measured,  # best of CONFIRM_REPEATS on the held-out batch; None: not raced
        "final_error": accepted["final_error"] if accepted else {k: 0.0 for k in batches},
        "fallback": fallback,
        "rounds": rounds,
        "blocks": [{"block": b.block, "crm": b.crm, "crm_share": b.crm_share, "igm": b.igm,
                    "chosen": asdict(p), "sequential_seconds": (T - 1) * b.sequential_step_seconds,
                    "candidates": [asdict(o) for o in cands[b.block]]} for b, p in zip(case.blocks, picks)],
        "decision_order": [b.block for b in active],
    }
    return plan.validate()


def hand_plan(spec: str, model: Model, guess: list[int] | None = None, tol: float = 0.0) -> Plan:
    """A paper-style plan (`7-8-32-10`, see Plan.from_paper_notation) bound to `model`."""
    plan = Plan.from_paper_notation(spec, len(model.blocks), model.num_tokens, guess, tol)
    plan.model_hash = model_hash(model)
    return plan
