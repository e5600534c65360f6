"""Block solvers: invert one TarFlow block sequentially, by Jacobi, GS-Jacobi or a sliding window.

Inverting one block means solving the triangular system
    x_0 = z_0,   x_t = z_t * exp(a_t(x_<t)) + b_t(x_<t),   t = 1..T-1
in the block's permuted token order. Every solver here is Gauss-Seidel over segments of tokens
with a preallocated KV cache of the solved prefix, and Jacobi inside a segment (1 token = the
sequential sampler; T-1 = plain Jacobi), or a Jacobi window that slides over the converged
prefix. A segment of L tokens is exact after L Jacobi iterations (the first k tokens are exact
after k), so a budget >= L reproduces sequential sampling up to floating-point reduction order.

A solver is one class, written once (as a diffusers scheduler is): a frozen dataclass deriving from
`BlockSolver`, which declares everything the engines, the profile, the scheduler and the plan file
read of it. Its fields are its block plan (checked in `__post_init__`; pydantic gives it a JSON
form); its `solve` is one loop of passes, each followed by a pass rule that updates the engine
state the class declares (`state`), so that one rule serves every engine (`engine.py`: eager,
static, graph). `register` adds a class to `SOLVERS`, the one list: the plan file's union
(`plan.BlockPlan`), `solve_block`'s dispatch and the profile's candidates read it. A solver outside
this package is its class and one `register` call (`tests/test_solver_contract.py` is the example).

The public API is `solve_block` (one block under one block plan, as sampling runs it) and
`jacobi_trace` (plain Jacobi iterations of one block with their residuals and, given the true
solution, their errors: what profiling and convergence figures read).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Annotated, Callable, ClassVar, Literal, NamedTuple, Union

import torch

from . import engine as engines
from .model import MetaBlock
from .schema import STRICT_FIELDS, SchemaError, check_finite, check_int, forget_types
from .spec import Guidance

DIVERGENCE_BOUND = 1e4
Init = Literal["z", "zeros"]
INIT_NAMES = ("z", "zeros")
COARSE_NAMES = ("bf16",)


class PlanError(SchemaError):
    """An invalid plan, or a plan that does not fit the model or spec it is used with."""


def _check_iteration(tol, max_iters, init, check_every=1) -> None:
    check_finite(tol, "tol", error=PlanError)  # a stopping threshold: 0 runs every pass to the cap
    check_int(max_iters, "max_iters", optional=True, error=PlanError)
    if init not in INIT_NAMES:
        raise PlanError(f"allowed values are {', '.join(INIT_NAMES)}", "init", init)
    check_int(check_every, "check_every", error=PlanError)


def _check_coarse(coarse, coarse_tol, tol) -> None:
    if coarse not in (None, *COARSE_NAMES):
        raise PlanError(f"allowed values are {', '.join(COARSE_NAMES)} or null", "coarse", coarse)
    if isinstance(coarse_tol, bool) or not isinstance(coarse_tol, (int, float)) or not math.isfinite(coarse_tol) \
            or (coarse is not None and coarse_tol < tol):
        raise PlanError(f"must be a finite number >= tol ({tol:g})", "coarse_tol", coarse_tol)


def _short(bp, *length: str) -> str:
    """One line for logs: `gs_jacobi/L32/zeros/tol0.001/cap10/bf16to0.01`."""
    max_iters = getattr(bp, "max_iters", None)
    return "/".join([bp.solver, *length, bp.init, f"tol{bp.tol:g}", *([f"cap{max_iters}"] if max_iters else []),
                     *([f"{bp.coarse}to{bp.coarse_tol:g}"] if bp.coarse else [])])


@dataclass
class BlockStats:
    block: int
    solver: str
    segment_len: int
    iterations: list[int] = field(default_factory=list)
    passes: int = 0
    residual: float = 0.0
    fallbacks: int = 0
    seconds: float = 0.0
    engine: str = "eager"
    coarse_passes: int = 0  # of `passes`, those run in bf16 before the float32 polish
    syncs: int = 0  # host reads of convergence state


# ---- the contract: what every solver is -----------------------------------------------------------------------------

class Candidate(NamedTuple):
    """One setting the profile tries: passes of `length` tokens, and `make(init, tol, cap=None, coarse_tol=None)`
    building its block plan. The profile also tries fixed iteration caps where `caps`, and a bf16 start handing
    over at `coarse_tol` where `coarse`."""

    length: int
    make: Callable[..., "BlockSolver"]
    caps: bool = False
    coarse: bool = False


class BlockSolver:
    """What the engines, the profile, the scheduler and the plan file read of a solver (diffusers'
    `SchedulerMixin` plays this part for schedulers). A solver is a frozen dataclass deriving from this
    class, with `__pydantic_config__ = STRICT_FIELDS`, a field `solver: Literal["<tag>"] = "<tag>"` (its
    name in plan files), its settings as fields checked in `__post_init__`, and:

    - `solve(run, stats)`: the loop. It sets state with `run.set`, runs passes with `run.pass_(rule, L)`
      and reads state with `run.read` (engine.Run); each rule is marked with `pass_rule`.
    - `segment_length(num_tokens)`: how many tokens a pass updates; `segments(num_tokens)`: the [start, end)
      ranges solved one after the other (the scheduler spreads convergence reads over them).
    - `candidates(num_tokens, segment_lens, windows)` (classmethod): the settings the profile tries, given
      the profile's segment lengths and windows.
    - `short()`: one line for logs and reports.

    The class attributes below have defaults a solver overrides where it differs. As a type, `BlockSolver`
    is any registered solver: pydantic reads it as the union of `SOLVERS` keyed by `solver`."""

    solver: str
    init: Init = "z"  # the iterate's start: z, or zeros (token 0 is z_0 either way)
    padding: ClassVar[int] = 0  # how far a static pass may run past the last token
    length_field: ClassVar[str | None] = None  # the field a plan checks against the model's tokens (<= T-1)
    coarse: str | None = None  # a reduced-precision start run before the float32 passes, or None
    # engine state the pass rules read and update, besides `start` and the engine's own (`engine.CORE_STATE`):
    # name -> (the host value, as eager holds it; the dtype of the 0-d tensor that holds it on static)
    state: ClassVar[dict[str, tuple[object, torch.dtype]]] = {}
    cost_only: ClassVar[tuple[str, ...]] = ()  # fields that change cost, never samples: not in a fingerprint

    def segment_length(self, num_tokens: int) -> int:
        raise NotImplementedError

    def segments(self, num_tokens: int) -> list[tuple[int, int]]:
        L = self.segment_length(num_tokens)
        return [(s, min(s + L, num_tokens)) for s in range(1, num_tokens, L)]

    @classmethod
    def candidates(cls, num_tokens: int, segment_lens, windows) -> list[Candidate]:
        return []

    def short(self) -> str:
        return self.solver

    def solve(self, run, stats: BlockStats) -> None:
        raise NotImplementedError

    def reading_every(self, passes: int) -> "BlockSolver":
        """This plan reading the device-side convergence state every `passes` passes, where it has that
        setting (`check_every`, cost only)."""
        return replace(self, check_every=passes) if "check_every" in self.cost_only else self

    def sample_settings(self, settings: dict) -> dict:
        """`settings` (this plan's JSON form) without what never changes samples: what a fingerprint hashes."""
        return {k: v for k, v in settings.items() if k not in self.cost_only}

    @staticmethod
    def registered() -> list[type["BlockSolver"]]:
        """The solvers `BlockSolver` stands for as a type (`schema` reads field paths through them)."""
        return list(SOLVERS.values())

    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler):
        if cls is not BlockSolver:  # a solver's own schema, from its fields
            return handler(source)
        from pydantic import Discriminator  # only reached from pydantic: tarflow needs torch alone
        return handler(Annotated[Union[tuple(BlockSolver.registered())], Discriminator("solver")])


SOLVERS: dict[str, type[BlockSolver]] = {}


def register(cls: type[BlockSolver]) -> type[BlockSolver]:
    """Add a solver class to `SOLVERS` (usable as a class decorator); plans, profiles and `solve_block` take
    it from then on."""
    tag = getattr(cls, "solver", None)
    if not (isinstance(cls, type) and issubclass(cls, BlockSolver) and is_dataclass(cls)
            and cls.__dataclass_params__.frozen and isinstance(tag, str)):
        raise TypeError(f"{cls!r}: a solver is a frozen dataclass deriving from BlockSolver with a `solver` tag field")
    if SOLVERS.get(tag, cls) is not cls:
        raise ValueError(f"solver {tag!r} is registered already ({SOLVERS[tag].__qualname__})")
    SOLVERS[tag] = cls
    forget_types()  # validators built before know the old union
    return cls


def is_registered(plan) -> bool:
    """Whether `plan` is an instance of the class its `solver` tag names in `SOLVERS` (a subclass of a
    registered solver is not: it would run as another solver)."""
    return SOLVERS.get(getattr(plan, "solver", None)) is type(plan)


def unregister(tag: str) -> None:
    """Remove the solver `tag` names: plans naming it are refused from then on."""
    SOLVERS.pop(tag, None)
    forget_types()


# ---- pass rules: what one pass does to the state, on any engine --------------------------------------------------
# `run` is an engine's run (engine.Run): the iterate `run.x` (batch, tokens, dim) and `run.prev` (tokens), `start`,
# the engine's `active` and `bound` and the state the solver declares (host values on eager, 0-d device tensors on
# static), and `run.live`: whether this pass counts (True on eager, which never runs a pass after a stop; the
# `active` flag on static, where passes after a stop run frozen until the host reads). A rule computes on
# tensors, takes values it decides with through `run.decide` (read once on eager; on static they stay on the
# device) and `run.where` (a choice), and stores the new state with one `run.put` (assigned on eager, copied in
# place on static: a captured pass updates its workspace). Operators are those both kinds of value share
# (`&`, `|`, `^ True`: a Python bool's `~` is an int). `span` is the pass's tokens start..start+L-1: `read` /
# `write` (a write only where `when` holds, `old` the values read before), and `valid` (None, or which tokens are
# real where a static pass runs past the last one).

def pass_rule(moves_start: bool, stops: bool):
    """Marks a pass rule with what the static engine must know of it: whether a pass may move `start` (up to
    its length: attention is sized for the furthest start), and whether it can stop the run on the device
    (then passes may run frozen after it, and must leave the KV cache as it was)."""
    def mark(rule):
        rule.moves_start, rule.stops = moves_start, stops
        return rule
    return mark


def checked(run, new, span):
    """(the tokens' values before the pass, whether the new values are finite and bounded on the real tokens,
    each token's move (worst sample and channel)): what a rule decides divergence and convergence from."""
    old = span.read(run.x)
    inside = new.abs() <= run.bound  # also False for NaN and inf
    moved = (new - old).abs().amax(dim=(0, 2))
    if span.valid is not None:
        inside = inside | ~span.valid.view(1, -1, 1)
        moved = torch.where(span.valid, moved, 0.0)
    return old, run.decide(inside.all()), moved


@pass_rule(moves_start=True, stops=False)
def step_pass(run, new, span) -> None:
    """One token from its exact inputs (the sequential sampler, and the divergence fallback); start += 1."""
    span.write(run.x, new, run.live)
    run.put(start=run.start + run.live)


def steps(run, start: int, count: int, stats: BlockStats) -> None:
    """Tokens start..start+count-1 one by one, which is exact: the fallback of any solver."""
    run.set(start=start, active=True)
    for _ in range(count):
        run.pass_(step_pass, 1)
    stats.passes += count


# ---- Gauss-Seidel over segments, Jacobi inside: sequential, Jacobi, GS-Jacobi --------------------------------------

# what the Jacobi family's rule keeps besides the engine's: a float64 `tol` compares with a 0-d move as exactly as a
# Python float does
ITERATION_STATE = {"bad": (False, torch.bool), "iters": (0, torch.long), "residual": (0.0, torch.float32),
                   "tol": (0.0, torch.float64)}


class GaussSeidelJacobi(BlockSolver):
    """The loop and pass rule of Sequential, Jacobi and GSJacobi: segments in order (Gauss-Seidel), Jacobi
    iterations inside each, after a bf16 start where the plan asks for one and the spec is float32."""

    state = {**ITERATION_STATE, "cap": (0, torch.long)}

    def solve(self, run, stats: BlockStats) -> None:
        T = run.num_tokens
        if self.segment_length(T) == 1:
            steps(run, 1, T - 1, stats)
            stats.iterations.extend([1] * (T - 1))
            return
        every = run.reads_every(self.check_every)
        coarse = self.coarse is not None and not run.autocast
        for s, e in self.segments(T):
            n = e - s
            if n == 1:
                steps(run, s, 1, stats)
                stats.iterations.append(1)
                continue
            if coarse:  # bf16 until the segment moves <= coarse_tol (at most n passes): a start, not a result
                with run.coarse():
                    self._iterate(run, s, n, self.coarse_tol, n, every, stats, coarse=True)
            cap = n if self.max_iters is None else min(self.max_iters, n)  # n iterations are already exact
            iters, bad, residual = self._iterate(run, s, n, self.tol, cap, every, stats)
            if bad:  # a diverging iterate: re-solve this segment token by token, which is exact
                steps(run, s, n, stats)
                stats.fallbacks += 1
                residual = 0.0
            stats.iterations.append(iters)
            # n iterations solve n tokens exactly: the last update is no error estimate
            stats.residual = max(stats.residual, 0.0 if iters == n else residual)

    @staticmethod
    def _iterate(run, start: int, n: int, tol: float, cap: int, every: int, stats: BlockStats, coarse=False):
        """Jacobi passes on tokens start..start+n-1 until the state says stop, read every `every` passes and at
        the cap: (iterations that counted, diverged, last move)."""
        run.set(start=start, tol=tol, cap=cap, iters=0, bad=False, residual=0.0, active=True)
        for it in range(1, cap + 1):
            run.pass_(GaussSeidelJacobi.jacobi_pass, n)
            if it % every == 0 or it == cap:
                stats.syncs += 1
                if not run.read("active")[0]:
                    break
        stats.passes += it
        if coarse:
            stats.coarse_passes += it
        stats.syncs += 1
        iters, bad, residual = run.read("iters", "bad", "residual")
        return iters, bad, residual

    @staticmethod
    @pass_rule(moves_start=False, stops=True)
    def jacobi_pass(run, new, span) -> None:
        """One Jacobi iteration of the segment; it stops (active False) when no token moved more than `tol`
        (max abs, worst sample), at `cap` iterations, or on an iterate that is not finite and bounded (bad:
        the iterate is not taken, the loop falls back to sequential steps). Iterates are never clamped."""
        old, ok, moved = checked(run, new, span)
        go = run.live & ok
        delta = run.decide(moved.max())
        span.write(run.x, new, go, old)
        iters = run.iters + run.live
        run.put(bad=run.bad | (run.live & (ok ^ True)), iters=iters, residual=run.where(go, delta, run.residual),
                active=go & (delta > run.tol) & (iters < run.cap))

    def sample_settings(self, settings: dict) -> dict:
        settings = super().sample_settings(settings)
        if settings.get("coarse", 0) is None:  # no bf16 start: hashed as before the option existed
            del settings["coarse"], settings["coarse_tol"]
        return settings

    @classmethod
    def _maker(cls, **fixed):
        """make(init, tol, cap=None, coarse_tol=None) of a Candidate: this class with `fixed` settings."""
        def make(init, tol, cap=None, coarse_tol=None):
            coarse = {} if coarse_tol is None else {"coarse": "bf16", "coarse_tol": coarse_tol}
            return cls(**fixed, tol=tol, max_iters=cap, init=init, **coarse)
        return make


@register
@dataclass(frozen=True)
class Sequential(GaussSeidelJacobi):
    """One token per step with the KV cache: exact. The baseline every candidate is measured against."""

    solver: Literal["sequential"] = "sequential"

    __pydantic_config__ = STRICT_FIELDS
    state = {}  # token steps use `start` alone

    def segment_length(self, num_tokens: int) -> int:
        return 1


# The Jacobi family stops a segment when no token moved more than `tol` in an iteration (max abs,
# worst sample) or after `max_iters` iterations (null: the segment length, where Jacobi is exact).
# `coarse` "bf16": iterate each segment under bf16 autocast until it moves <= `coarse_tol`, then on
# in float32 to `tol` (a no-op under a bf16 spec). `check_every`: on the static engine (CUDA), read
# the device-side convergence flags every k passes instead of every pass; passes after a segment
# converged are no-ops there, so k changes the cost, never the samples (`cost_only`).

@register
@dataclass(frozen=True, kw_only=True)
class Jacobi(GaussSeidelJacobi):
    """All T-1 unknown tokens of the block at once."""

    solver: Literal["jacobi"] = "jacobi"
    tol: float = 1e-4
    max_iters: int | None = None
    init: Init = "z"
    coarse: Literal["bf16"] | None = None
    coarse_tol: float = 1e-2
    check_every: int = 1

    __pydantic_config__ = STRICT_FIELDS
    cost_only = ("check_every",)

    def __post_init__(self):
        _check_iteration(self.tol, self.max_iters, self.init, self.check_every)
        _check_coarse(self.coarse, self.coarse_tol, self.tol)

    def segment_length(self, num_tokens: int) -> int:
        return num_tokens - 1

    @classmethod
    def candidates(cls, num_tokens: int, segment_lens, windows) -> list[Candidate]:
        L = num_tokens - 1
        return [Candidate(L, cls._maker(), caps=True, coarse=True)] if L in segment_lens else []

    def short(self) -> str:
        return _short(self)


@register
@dataclass(frozen=True, kw_only=True)
class GSJacobi(GaussSeidelJacobi):
    """Segments of `segment_len` tokens in order (Gauss-Seidel), Jacobi inside each."""

    solver: Literal["gs_jacobi"] = "gs_jacobi"
    segment_len: int
    tol: float = 1e-4
    max_iters: int | None = None
    init: Init = "z"
    coarse: Literal["bf16"] | None = None
    coarse_tol: float = 1e-2
    check_every: int = 1

    __pydantic_config__ = STRICT_FIELDS
    length_field = "segment_len"
    cost_only = ("check_every",)

    def __post_init__(self):
        check_int(self.segment_len, "segment_len", error=PlanError)
        _check_iteration(self.tol, self.max_iters, self.init, self.check_every)
        _check_coarse(self.coarse, self.coarse_tol, self.tol)

    def segment_length(self, num_tokens: int) -> int:
        return self.segment_len

    @classmethod
    def candidates(cls, num_tokens: int, segment_lens, windows) -> list[Candidate]:
        return [Candidate(L, cls._maker(segment_len=L), caps=True, coarse=True)
                for L in segment_lens if L < num_tokens - 1]

    def short(self) -> str:
        return _short(self, f"L{self.segment_len}")


EXACT = Sequential()  # the plan sampling is exact under, and every other plan is measured against


def paper_block(num_gs: int, cap: int, tol: float, init: str, num_tokens: int) -> BlockSolver:
    """One entry of the public GS-Jacobi code's lists as a block plan: `num_gs` segments (0 or T: sequential,
    1: plain Jacobi) of at most `cap` Jacobi iterations. At tol 0 a segment stops early only at an exact
    fixed point, so the device-side flags are read at the cap only."""
    every = cap if tol == 0 else 1
    if num_gs in (0, num_tokens):
        return Sequential()
    if num_gs == 1:
        return Jacobi(max_iters=cap, tol=tol, init=init, check_every=every)
    return GSJacobi(segment_len=-(-(num_tokens - 1) // num_gs), max_iters=cap, tol=tol, init=init, check_every=every)


def timing_plan(length: int, passes: int) -> BlockSolver:
    """Segments of `length` tokens, `passes` passes each whatever they converge to (tol 0): what the profile
    times a pass of that length with."""
    return GSJacobi(segment_len=length, tol=0.0, max_iters=passes)


# ---- the sliding window --------------------------------------------------------------------------------------------

@register
@dataclass(frozen=True, kw_only=True)
class Sliding(BlockSolver):
    """Jacobi over a window of `window` tokens that starts at the first unconverged token; the
    converged prefix keeps its keys/values. It advances at least one token per pass: no cap.
    A token is final once every token before it in the window moved <= `tol` in the last two
    passes (see `window_pass`)."""

    solver: Literal["sliding"] = "sliding"
    window: int
    tol: float = 1e-4
    init: Init = "z"
    check_every: int = 1

    __pydantic_config__ = STRICT_FIELDS
    length_field = "window"
    state = ITERATION_STATE
    cost_only = ("check_every",)

    def __post_init__(self):
        check_int(self.window, "window", error=PlanError)
        _check_iteration(self.tol, None, self.init, self.check_every)

    @property
    def padding(self) -> int:
        return self.window  # a static window runs past the last token

    def segment_length(self, num_tokens: int) -> int:
        return self.window

    def segments(self, num_tokens: int) -> list[tuple[int, int]]:
        return [(1, num_tokens)]  # one stopping rule over the whole block

    @classmethod
    def candidates(cls, num_tokens: int, segment_lens, windows) -> list[Candidate]:
        return [Candidate(W, lambda init, tol, W=W: cls(window=W, tol=tol, init=init))
                for W in windows if 2 <= W < num_tokens - 1]

    def short(self) -> str:
        return _short(self, f"W{self.window}")

    def solve(self, run, stats: BlockStats) -> None:
        """Windows from token 1 until the block is final. Progress is at least one token per pass, so at
        most T-1 passes (where the state is read whatever `check_every` says), and tol=0 is exact."""
        T, W = run.num_tokens, self.window
        every = run.reads_every(self.check_every)
        run.set(start=1, tol=self.tol, iters=0, bad=False, residual=0.0, active=True)
        done = 0
        while True:
            run.pass_(Sliding.window_pass, W)
            stats.passes += 1
            done += 1
            if done % every and done < T - 1:
                continue
            stats.syncs += 1
            if run.read("active")[0]:
                continue
            stats.syncs += 1
            bad, s, iters = run.read("bad", "start", "iters")
            if not bad:
                break
            # a diverging window: its tokens one by one, which is exact, then on from the next
            e = min(s + W, T)
            steps(run, s, e - s, stats)
            stats.fallbacks += 1
            run.set(iters=iters + e - s, bad=False, active=e < T)
            if e == T:
                break
        stats.syncs += 1
        iters, residual = run.read("iters", "residual")
        stats.iterations.append(iters)
        stats.residual = max(stats.residual, residual)

    @staticmethod
    @pass_rule(moves_start=True, stops=True)
    def window_pass(run, new, span) -> None:
        """One pass of the window; it slides past the tokens that are final.

        After a pass the window's first token is exact (its inputs are final). A later token is final,
        up to `tol`, when every token before it in the window moved by <= tol in this pass and in the one
        before: its inputs were then stable over the two iterates it and its cached keys/values were
        computed from (one quiet pass is not enough: a token can pause on its way; docs/benchmarks.md
        has the figures). Final tokens' keys/values stay in the
        cache, as ParaDiGMS does for diffusion, so no pass is spent on converged tokens (fixed segments
        wait for their slowest token). The run stops at the end of the block or on divergence (bad)."""
        old, ok, moved = checked(run, new, span)
        go = run.live & ok
        prev = span.read(run.prev, dim=0)
        stable = (moved <= run.tol) & (prev <= run.tol)
        if span.valid is not None:
            stable = stable | ~span.valid
        L = new.shape[1]
        ar = torch.arange(L, device=new.device)
        # the first unstable token is final too
        advance = run.decide(torch.where(stable, L, ar).min().clamp(max=L - 1) + 1)
        accepted = run.decide(torch.where(ar < advance - 1, moved, 0.0).max())
        span.write(run.x, new, go, old)
        span.write(run.prev, moved, go, prev, dim=0)
        end = run.start + advance  # past the last token where a static window runs past it
        start = run.where(go, run.where(end < run.num_tokens, end, run.num_tokens), run.start)
        run.put(residual=run.where(go & (accepted > run.residual), accepted, run.residual), iters=run.iters + run.live,
                bad=run.bad | (run.live & (ok ^ True)), start=start, active=go & (start < run.num_tokens))




# ---- one block -----------------------------------------------------------------------------------------------------

class BlockSolution(NamedTuple):
    x: torch.Tensor  # the block's input (B, T, D), model token order
    stats: BlockStats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def solve_block(block: MetaBlock, z: torch.Tensor, labels=None, plan: BlockSolver = EXACT, guidance: Guidance = Guidance(),
                divergence_bound: float = DIVERGENCE_BOUND, index: int = 0, engine="auto") -> BlockSolution:
    """Invert one block under one block plan: its output z -> its input x.

    Args:
        block: the block (`model.blocks[i]`).
        z: the block's output (B, T, D), model token order.
        labels: class ids (B,) or None, as in `sampling.sample`.
        plan: an instance of a registered solver (default: exact token steps).
        guidance: classifier-free guidance of the passes.
        divergence_bound: an iterate beyond it (or not finite) falls back to token steps.
        index: the block's forward index, recorded in the statistics.
        engine: "auto" (graph on CUDA, eager elsewhere), "eager", "static", "graph" (`engine.py`), or an
            engine object such as `engine.Static(capture=...)`.

    Returns:
        BlockSolution: x (B, T, D), model token order, and the solver's statistics (`stats.seconds`
        includes waiting for the device).
    """
    t0 = time.perf_counter()
    if not is_registered(plan):
        raise TypeError(f"{plan!r} is not a registered block plan (tarflow.solvers.SOLVERS: {', '.join(SOLVERS)})")
    runner = engines.resolve(engine, z.device)
    stats = BlockStats(index, plan.solver, plan.segment_length(z.shape[1]))
    run = runner.start(block, z, labels, guidance, divergence_bound, plan)
    plan.solve(run, stats)
    x = block.permute(run.result())
    stats.engine = run.engine_name
    _sync(z.device)
    stats.seconds = time.perf_counter() - t0
    return BlockSolution(x, stats)


@dataclass
class JacobiTrace:
    """Plain Jacobi over a whole block, iteration by iteration (index k: after k + 1 iterations)."""

    residuals: list[float]  # max |x_k - x_(k-1)| over the batch
    errors: list[float] | None = None  # max |x_k - solution| over the batch, when a solution was given
    iterates: list[torch.Tensor] = field(default_factory=list)  # x_k in model order, when kept


@torch.inference_mode()
def jacobi_trace(block: MetaBlock, z: torch.Tensor, labels=None, init: str = "z", guidance: Guidance = Guidance(),
                 max_iters: int | None = None, solution: torch.Tensor | None = None, floor: float = 0.0,
                 keep_iterates: bool = False) -> JacobiTrace:
    """Iterate plain Jacobi on one block from `init` for `max_iters` (default T-1, where it is exact)
    iterations, or until the residual is <= `floor`. `solution` (the block's true input, model order)
    adds each iterate's error."""
    run = engines.EagerRun(block, z, labels, guidance, init=init)
    T = run.num_tokens
    truth = None if solution is None else block.permute(solution.float())
    x = run.x
    trace = JacobiTrace([], [] if truth is not None else None)
    for _ in range(min(max_iters or T - 1, T - 1)):
        new = run.update(x, 1, T)
        trace.residuals.append((new - x[:, 1:]).abs().max().item())
        x[:, 1:] = new
        if truth is not None:
            trace.errors.append((x - truth).abs().max().item())
        if keep_iterates:
            trace.iterates.append(block.permute(x.clone()))
        if trace.residuals[-1] <= floor:
            break
    return trace
