"""Scheduler: from a profile, the fastest plan that stays within a tolerance of sequential sampling.

Per block the candidates are sequential sampling and every solver setting the profile
ran (Jacobi, GS-Jacobi segment lengths, sliding windows; z or zeros start; stopping
tolerances). A candidate's predicted time is its measured passes times the measured
seconds per pass on the profiled device and batch size; sequential is (T-1) measured
steps. Each block takes the fastest candidate whose error against the block's true
solution is within a per-block budget, so the plan is never predicted slower than
sequential, and a block where nothing parallel beats sequential on this hardware
stays sequential.

Per-block errors do not bound the final error (it accumulates across blocks), so the
chosen plan is checked by sampling: the calibration noise and a held-out noise batch,
plan vs sequential, max abs difference of the final images in model space. While that
exceeds half the tolerance (a margin for noise the calibration never saw) the budgets
shrink and the choice is made again; sequential everywhere always passes. CRM and IGM
are the paper's priors: they are reported per block beside the measured choice and
break ties (lower IGM start first).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from tarflow import Model, Plan, model_hash, sample
from tarflow.noise import sample_noise
from tarflow.plan import BlockPlan

from .profile import BlockProfile, Profile, ProfileError, calibration_batch

TIE_FRACTION = 0.03  # candidates within 3% of the fastest predicted time count as equally fast
MAX_ROUNDS = 8
# the worst of a few calibration images underestimates the worst of many: verify at half the tolerance
VERIFY_MARGIN = 0.5


@dataclass
class Option:
    solver: str
    segment_len: int | None
    init: str
    tol: float
    passes: float
    error: float  # max abs vs the block's true solution on the calibration batch
    predicted_seconds: float

    def block_plan(self) -> BlockPlan:
        return BlockPlan(self.solver, self.segment_len, None, self.tol, self.init)


def block_options(b: BlockProfile, num_tokens: int) -> list[Option]:
    seq = Option("sequential", None, "z", 0.0, num_tokens - 1, b.sequential_error,
                 (num_tokens - 1) * b.sequential_step_seconds)
    return [seq] + [Option(r.solver, None if r.solver == "jacobi" else r.segment_len, r.init, r.tol, r.passes,
                           r.error, r.passes * b.pass_seconds[str(r.segment_len)]) for r in b.convergence]


def choose(b: BlockProfile, num_tokens: int, budget: float) -> tuple[Option, list[Option]]:
    """The fastest option within `budget` (ties: lower IGM start, then looser tol); sequential if none."""
    options = block_options(b, num_tokens)
    ok = [o for o in options if o.solver == "sequential" or o.error <= budget]
    fastest = min(o.predicted_seconds for o in ok)
    tied = [o for o in ok if o.predicted_seconds <= fastest * (1 + TIE_FRACTION)]
    # sequential wins a tie (nothing to lose); else the start with the lower IGM, then the looser tol
    best = min(tied, key=lambda o: (o.solver != "sequential", b.igm[o.init], o.predicted_seconds, -o.tol))
    return best, sorted(ok, key=lambda o: o.predicted_seconds)[:4]


def _sample_chunks(model, noise, labels, plan, guidance, batch_size):
    """Images and wall seconds, sampling in batches of the plan's batch size."""
    images, seconds = [], 0.0
    for s in range(0, noise.shape[0], batch_size):
        y = None if labels is None else labels[s:s + batch_size]
        t0 = time.perf_counter()
        images.append(sample(model, noise[s:s + batch_size], y, plan, guidance=guidance).images)
        seconds += time.perf_counter() - t0
    return torch.cat(images), seconds


def schedule(profile: Profile, model: Model, tol: float = 1e-3, guidance: float | None = None,
             holdout_seed: int | None = None) -> Plan:
    """The auto plan for `model` from its `profile` (see the module docstring).

    `tol` bounds the max abs deviation of final images (model space) from sequential
    sampling on the calibration noise and on a held-out batch of the same size
    (seeded `holdout_seed`, default: the calibration seed + 1)."""
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
    held_noise = sample_noise(held_seed, range(cal["num_images"]), T, model.token_dim)
    held_labels = None
    if calib.labels is not None:
        held_labels = torch.randint(model.config.num_classes, (cal["num_images"],),
                                    generator=torch.Generator().manual_seed(held_seed))
    batches = {"calibration": (calib.noise, calib.labels), "held_out": (held_noise, held_labels)}
    sequential = Plan.sequential(profile.num_blocks, T)
    reference = {k: _sample_chunks(model, n, y, sequential, case.guidance, B) for k, (n, y) in batches.items()}

    target = tol * VERIFY_MARGIN
    budget, rounds = target, []
    while True:
        picks = [choose(b, T, budget) for b in case.blocks]
        plan = Plan(profile.num_blocks, T, [p.block_plan() for p, _ in picks], model_hash=profile.model_hash,
                    name="auto").validate()
        errors, seconds = {}, {}
        for k, (n, y) in batches.items():
            images, seconds[k] = _sample_chunks(model, n, y, plan, case.guidance, B)
            errors[k] = (images - reference[k][0]).abs().max().item()
        worst = max(errors.values())
        rounds.append({"block_error_budget": budget, "final_error": errors, "seconds": seconds})
        if worst <= target or all(p.solver == "sequential" for p, _ in picks) or len(rounds) == MAX_ROUNDS:
            break
        # errors grow roughly in proportion to the per-block budget: aim below the target with margin
        budget /= min(1e3, max(4.0, 2 * worst / target))
    measured = sum(rounds[-1]["seconds"].values())
    measured_seq = sum(r[1] for r in reference.values())
    fallback = None
    if worst > target:
        fallback = "round limit reached above the verified tolerance"
    elif measured > measured_seq and any(p.solver != "sequential" for p, _ in picks):
        fallback = "measured slower than sequential on this device"
    if fallback:  # sequential everywhere is exact and never slower than itself
        picks = [(block_options(b, T)[0], []) for b in case.blocks]
        plan = Plan.sequential(profile.num_blocks, T)
        plan.model_hash, plan.name = profile.model_hash, "auto"
    seq_pred = sum((T - 1) * b.sequential_step_seconds for b in case.blocks)
    plan_pred = sum(p.predicted_seconds for p, _ in picks)
    plan.evidence = {
        "profile": {"model_hash": profile.model_hash, "device": profile.device, "batch_size": B,
                    "calibration": cal, "torch_version": profile.torch_version},
        "guidance": case.guidance,
        "tol": tol,
        "predicted_seconds": {"plan": plan_pred, "sequential": seq_pred, "speedup": seq_pred / plan_pred},
        "measured_seconds": {"plan": measured, "sequential": measured_seq},
        "fallback": fallback,
        "rounds": rounds,
        "blocks": [{"block": b.block, "crm": b.crm, "crm_share": b.crm_share, "igm": b.igm,
                    "chosen": asdict(p), "sequential_seconds": (T - 1) * b.sequential_step_seconds,
                    "alternatives": [asdict(o) for o in alts]} for b, (p, alts) in zip(case.blocks, picks)],
    }
    return plan.validate()


def hand_plan(spec: str, model: Model, guess: list[int] | None = None, tol: float = 0.0) -> Plan:
    """A paper-style plan (`7-8-32-10`, see Plan.from_paper_notation) bound to `model`."""
    plan = Plan.from_paper_notation(spec, len(model.blocks), model.num_tokens, guess, tol)
    plan.model_hash = model_hash(model)
    return plan
