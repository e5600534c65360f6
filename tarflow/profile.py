"""Profiling: how each block of a model converges and what each solver costs, on this device.

For each block, on its true (z, x) pairs from a calibration batch: the paper's CRM and IGM,
the passes every candidate solver needs to reach each stopping tolerance and the error each
fixed iteration cap leaves (both against the true solution), and the measured seconds per
sequential step and per parallel pass at the spec's batch size. The scheduler
(`tarflow.schedule`) turns a profile into a plan. `profile_model` runs it all in this process
with torch alone; the Ray stage (`workflows.stages.profile`) runs the same parts, `calibrate`
in one task and `profile_block` in one task per block, then `assemble`.

The true pairs come from `tarflow.calibration`.
"""
from __future__ import annotations

import copy
import functools
import platform
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from .calibration import CalibrationSource, calibrate
from .checkpoint import ModelRef, model_hash
from .metrics import CRM, crm, crm_shares, igm
from .model import Model
from .plan import INIT_NAMES, BlockPlan
from .schema import STRICT_FIELDS, JSONForm, SchemaError, check_finite, check_int
from .solvers import EXACT, SOLVERS, Candidate, solve_block, timing_plan
from .spec import SamplingSpec

PROFILE_VERSION = 2
# stopping tolerances and iteration caps tried per setting: a fine ladder, because the scheduler
# can only spend the error budget in the steps the profile measured
DEFAULT_TOLS = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
DEFAULT_CAPS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 384, 512)
DEFAULT_WINDOWS = (32, 64)
PASSES_TIMED = 3
COARSE_TOL = 1e-2  # where a bf16 start hands over to float32: a few bf16 roundings of values of order 1
COARSE_GAIN = 0.9  # a bf16 pass must cost < 90% of a float32 one to be worth trying


class ProfileError(SchemaError):
    """An invalid profile, or a profile that does not fit the model it is used with."""


def _at_least(low: float, values: dict) -> None:
    """Each value (keyed by its path from the object checked; a dict value: each of its entries) >= low."""
    for loc, value in values.items():
        loc = loc if isinstance(loc, tuple) else (loc,)
        for key, v in value.items() if isinstance(value, dict) else ((None, value),):
            check = check_int if isinstance(v, int) else check_finite  # counts as counts, measures as numbers
            check(v, loc if key is None else (*loc, key), low, error=ProfileError)


@dataclass
class ConvergenceRun:
    """One block plan run on the calibration rows in chunks of the batch size: per chunk, its
    network passes (mean; of them `coarse_passes` in bf16), the most Jacobi iterations a segment
    took, the error against the true solution (max over all rows), the wall seconds (mean) and
    the engine that ran it (`solvers.solve_block`)."""

    plan: BlockPlan
    passes: float
    max_iters: int
    error: float
    seconds: float
    coarse_passes: float = 0.0
    engine: str = "eager"

    __pydantic_config__ = STRICT_FIELDS

    def __post_init__(self):
        _at_least(0, {"passes": self.passes, "max_iters": self.max_iters, "error": self.error,
                      "seconds": self.seconds, "coarse_passes": self.coarse_passes})


@dataclass
class BlockProfile:
    block: int  # forward index: model.blocks[block]
    crm: float
    crm_share: float
    crm_terms: CRM
    igm: dict[Literal["z", "zeros"], float]
    sequential_step_seconds: float
    sequential_error: float  # exact sampling vs the true solution: the floating-point floor
    pass_seconds: dict[int, float]  # segment length -> seconds per parallel pass over that many tokens
    convergence: list[ConvergenceRun]
    engine: str = "eager"  # what the step and pass timings ran on
    coarse_pass_seconds: dict[int, float] = field(default_factory=dict)  # the same passes in bf16, where timed

    __pydantic_config__ = STRICT_FIELDS

    def __post_init__(self):
        if set(self.igm) != set(INIT_NAMES):
            raise ProfileError(f"has keys {sorted(self.igm)}; expected {list(INIT_NAMES)}", "igm")
        t = self.crm_terms
        _at_least(0, {"block": self.block, "crm": self.crm, "crm_share": self.crm_share, "igm": self.igm,
                      "sequential_step_seconds": self.sequential_step_seconds,
                      "sequential_error": self.sequential_error, "pass_seconds": self.pass_seconds,
                      "coarse_pass_seconds": self.coarse_pass_seconds,
                      **{("crm_terms", k): getattr(t, k) for k in ("mean_alpha_x", "scale_weight", "shift_weight")}})
        if self.crm_share > 1:
            raise ProfileError("a share is in [0, 1]", "crm_share", self.crm_share)


@dataclass
class Profile(JSONForm):
    model_hash: str
    model: ModelRef | None  # what reloads the model (None: a model built in code)
    num_blocks: int
    num_tokens: int
    token_dim: int
    spec: SamplingSpec  # the sampling map profiled, at spec.batch_size
    calibration: CalibrationSource
    device: str
    threads: int
    torch_version: str
    tols: list[float]
    caps: list[int]
    blocks: list[BlockProfile]  # by forward index
    seconds: float = 0.0
    version: int = PROFILE_VERSION

    __pydantic_config__ = STRICT_FIELDS
    json_name, json_error = "profile", ProfileError

    def __post_init__(self):
        if self.version != PROFILE_VERSION:
            raise ProfileError(f"this build reads version {PROFILE_VERSION} (re-run `tarflow-gs profile` to make one)",
                               "version", self.version)
        _at_least(1, {"num_blocks": self.num_blocks, "token_dim": self.token_dim, "threads": self.threads,
                      "caps": dict(enumerate(self.caps)), ("calibration", "num_images"): self.calibration.num_images})
        _at_least(2, {"num_tokens": self.num_tokens})
        _at_least(0, {"seconds": self.seconds, ("calibration", "seed"): self.calibration.seed})
        if any(not t > 0 for t in self.tols):
            raise ProfileError("every tolerance must be > 0", "tols", self.tols)
        if len(self.blocks) != self.num_blocks:
            raise ProfileError(f"has {len(self.blocks)} entries, num_blocks={self.num_blocks}", "blocks")
        for j, b in enumerate(self.blocks):
            if b.block != j:
                raise ProfileError("blocks must be listed in forward order", ("blocks", j, "block"), b.block)
            bad = [L for L in b.pass_seconds if not 1 <= L <= self.num_tokens - 1]
            if bad:
                raise ProfileError(f"has segment length {bad[0]}: must be in 1..{self.num_tokens - 1}",
                                   ("blocks", j, "pass_seconds"))
            for k, r in enumerate(b.convergence):
                L = r.plan.segment_length(self.num_tokens)
                if L < 2 or L not in b.pass_seconds or (r.plan.coarse and L not in b.coarse_pass_seconds):
                    raise ProfileError(f"has {r.plan.short()}: each must be a parallel plan whose segment length "
                                       "has a measured cost in pass_seconds (and in coarse_pass_seconds for a bf16 "
                                       "start)", ("blocks", j, "convergence", k))

    def check_model(self, model: Model) -> None:
        if model_hash(model) != self.model_hash:
            raise ProfileError(f"the profile was made for model {self.model_hash}, this model is {model_hash(model)}")



# ---- one block -----------------------------------------------------------------------------------------------

def default_segment_lens(num_tokens: int) -> list[int]:
    """Plain Jacobi (T-1) and 4 and 8 equal segments, as the paper's GS counts."""
    lens = [-(-(num_tokens - 1) // k) for k in (1, 4, 8)]
    return sorted({n for n in lens if n >= 2}, reverse=True)


def candidate_plans(num_tokens: int, segment_lens, windows) -> list[Candidate]:
    """Every setting the profile tries: each registered solver's `candidates`."""
    return [c for solver in SOLVERS.values() for c in solver.candidates(num_tokens, segment_lens, windows)]


@dataclass
class Costs:
    """Seconds per sequential step and per parallel pass (by segment length) that decide what is worth
    profiling: measured on the device by default, or given (to profile as if on other hardware)."""

    sequential_step_seconds: float
    pass_seconds: dict[int, float]
    coarse_pass_seconds: dict[int, float] = field(default_factory=dict)  # bf16 passes, by segment length


@torch.inference_mode()
def profile_block(block, index: int, z: torch.Tensor, x: torch.Tensor, labels, spec: SamplingSpec, segment_lens,
                  windows, tols, caps=DEFAULT_CAPS, repeats: int = 3, costs: Costs | None = None) -> BlockProfile:
    """Everything the scheduler needs about one block (`crm_share` is filled in by `profile_model`).

    Settings that are predictably slower than sequential on this device are not run (or not run
    at tighter tolerances): the scheduler could never choose them. z, x (N, T, D) are the block's
    true pairs on the calibration rows; solves run in chunks of the spec's batch size, so passes
    and seconds are what a batch of that size costs. `costs` replaces the timing of steps and passes."""
    g, B, T = spec.guidance, spec.batch_size, z.shape[1]
    chunks = [slice(s, s + B) for s in range(0, z.shape[0], B)]

    def lab(c):
        return None if labels is None else labels[c]

    def solve(c, bp, autocast=None):
        """`bp` on chunk `c` under the spec's autocast, or under `autocast` where given."""
        context = torch.autocast(z.device.type, dtype=autocast) if autocast else spec.autocast_context(z.device.type)
        with context:
            return solve_block(block, z[c], lab(c), bp, g)

    def timed(bp, autocast=None) -> float:
        """Best-of-`repeats` seconds per pass (network call) of `bp` on the first chunk: the engine as
        sampling will run it (captured on CUDA)."""
        passes = solve(chunks[0], bp, autocast).stats.passes  # also the warm-up: allocator, kernels, capture
        return min(solve(chunks[0], bp, autocast).stats.seconds for _ in range(repeats)) / passes

    options = candidate_plans(T, segment_lens, windows)
    lengths = sorted({c.length for c in options})
    coarse_seconds: dict[int, float] = {}
    if costs is None:
        seq_seconds = timed(EXACT)
        # a few passes per segment (tol 0 runs them all) average out timer and scheduler noise
        pass_seconds = {L: timed(timing_plan(L, PASSES_TIMED)) for L in lengths}
        if spec.autocast == "fp32":  # whether a bf16 start can pay here: the same passes in bf16
            coarse_seconds = {L: timed(timing_plan(L, PASSES_TIMED), torch.bfloat16) for L in lengths}
    else:
        seq_seconds, pass_seconds = costs.sequential_step_seconds, dict(costs.pass_seconds)
        coarse_seconds = dict(costs.coarse_pass_seconds)
    coarse_lengths = {L for L, c in coarse_seconds.items() if c < COARSE_GAIN * pass_seconds[L]}
    seq_error = max((solve(c, EXACT).x - x[c]).abs().max().item() for c in chunks)
    runs: list[ConvergenceRun] = []
    sequential_block = (T - 1) * seq_seconds

    def measure(bp) -> ConvergenceRun:
        solved = [solve(c, bp) for c in chunks]
        run = ConvergenceRun(bp, sum(s.stats.passes for s in solved) / len(solved),
                             max(max(s.stats.iterations) for s in solved),
                             max((s.x - x[c]).abs().max().item() for s, c in zip(solved, chunks)),
                             sum(s.stats.seconds for s in solved) / len(solved),
                             sum(s.stats.coarse_passes for s in solved) / len(solved), solved[0].stats.engine)
        runs.append(run)
        return run

    for option in options:
        L, make = option.length, option.make
        pass_cost = pass_seconds[L]
        if -(-(T - 1) // L) * pass_cost >= sequential_block:
            continue  # even one pass per segment is slower than sequential here: never chosen
        for init in INIT_NAMES:
            for tol in sorted(tols, reverse=True):  # loosest first: tighter ones only take longer
                if measure(make(init, tol)).passes * pass_cost >= sequential_block:
                    break
            if option.coarse and L in coarse_lengths:  # bf16 to COARSE_TOL, float32 from there: finer tols only
                for tol in sorted((t for t in tols if t < COARSE_TOL), reverse=True):
                    r = measure(make(init, tol, coarse_tol=COARSE_TOL))
                    if r.coarse_passes * coarse_seconds[L] + (r.passes - r.coarse_passes) * pass_cost \
                            >= sequential_block:
                        break
            # fixed iteration counts: no pass is spent detecting convergence; caps >= L are exact
            # Jacobi, which the tightest tolerance already covers for fewer passes
            for cap in sorted(c for c in caps if c < L) if option.caps else ():
                r = measure(make(init, 0.0, cap))
                if r.passes * pass_cost >= sequential_block or r.error <= min(tols, default=0.0):
                    break
    c = crm(block, x, labels)
    engine = solve(chunks[0], EXACT).stats.engine
    return BlockProfile(index, c.value, 0.0, c, {init: igm(block, z, x, init, labels, g) for init in INIT_NAMES},
                        seq_seconds, seq_error, pass_seconds, runs, engine, coarse_seconds)


# ---- the model -----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:  # not Linux
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def device_name(device: torch.device, threads: int) -> str:
    """What does `device`'s work, as timings compare: the GPU's model name, or the CPU's model and torch
    threads (`cuda:0` says nothing about which GPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({_cpu_name()}, {threads} threads)"


def assemble(model: Model, spec: SamplingSpec, source: CalibrationSource, blocks: list[BlockProfile], device: str,
             threads: int, tols, caps, seconds: float, model_ref: ModelRef | None = None) -> Profile:
    """The profile from its per-block parts (CRM shares are relative to all blocks)."""
    for b, share in zip(blocks, crm_shares([b.crm for b in blocks])):
        b.crm_share = share
    return Profile(model_hash(model), model_ref, len(model.blocks), model.num_tokens, model.token_dim, spec, source,
                   device, threads, torch.__version__, [float(t) for t in tols], [int(c) for c in caps], blocks,
                   seconds)


def check_segment_lens(num_tokens: int, segment_lens) -> list[int]:
    segment_lens = sorted(set(segment_lens or default_segment_lens(num_tokens)), reverse=True)
    bad = [L for L in segment_lens if not 2 <= L <= num_tokens - 1]
    if bad:
        raise ProfileError(f"each must be in 2..{num_tokens - 1} (T-1 is plain Jacobi)", "segment_lens", bad)
    return segment_lens


def profile_model(model: Model, spec: SamplingSpec = SamplingSpec(), data: str | None = None, num_images: int = 8,
                  device: str = "cpu", segment_lens: list[int] | None = None, windows=DEFAULT_WINDOWS,
                  tols=DEFAULT_TOLS, caps=DEFAULT_CAPS, repeats: int = 3, model_ref: ModelRef | None = None,
                  costs: Costs | None = None) -> Profile:
    """Profile every block of `model` under `spec`, in this process with its torch threads. The caller's
    model stays where it is (`model_on`).

    Args:
        model: the TarFlow model.
        spec: the sampling spec, made concrete for the model; its batch size is what passes are timed at.
        data: calibration images (a dataset name or path); None: the model's own samples.
        num_images: calibration rows, solved in chunks of `spec.batch_size` (rounded up to whole chunks).
        device: where to profile.
        segment_lens, windows: the settings the solvers' `candidates` take (default: `default_segment_lens`,
            DEFAULT_WINDOWS).
        tols, caps: stopping tolerances and fixed iteration caps tried per setting.
        repeats: timings per measurement (the best is kept).
        model_ref: what reloads the model, recorded in the profile.
        costs: seconds per step and per pass to use instead of timing (to profile as if on other hardware).

    Returns:
        Profile: per block, CRM, IGM, step and pass costs and every candidate's passes and error.
    """
    start = time.perf_counter()
    segment_lens = check_segment_lens(model.num_tokens, segment_lens)
    dev = torch.device(device)
    here = model_on(model, dev)
    source, labels, pairs = calibrate(here, spec, data, num_images, dev)
    labels = None if labels is None else labels.to(dev)
    blocks = [profile_block(here.blocks[i], i, z.to(dev), x.to(dev), labels, spec, segment_lens, windows, tols, caps,
                            repeats, costs) for i, (z, x) in enumerate(pairs)]
    threads = torch.get_num_threads()
    return assemble(model, spec, source, blocks, device_name(dev, threads), threads, tols, caps,
                    time.perf_counter() - start, model_ref)


def model_on(model: Model, device) -> Model:
    """`model` where it already lives on `device`, else a copy there: profiling and planning never move the
    caller's model (a move is a side effect nobody asked for, and new storage under its blocks)."""
    device = torch.empty(0, device=device).device  # "cuda" as the current "cuda:N"
    if all(p.device == device for p in model.parameters()):
        return model
    return copy.deepcopy(model).to(device)
