"""Block solvers: invert one TarFlow block sequentially, by Jacobi, GS-Jacobi or a sliding window.

Inverting one block means solving the triangular system
    x_0 = z_0,   x_t = z_t * exp(a_t(x_<t)) + b_t(x_<t),   t = 1..T-1
in the block's permuted token order. Every solver here is Gauss-Seidel over segments of tokens
with a preallocated KV cache of the solved prefix, and Jacobi inside a segment (1 token = the
sequential sampler; T-1 = plain Jacobi), or a Jacobi window that slides over the converged
prefix. A segment of L tokens is exact after L Jacobi iterations (the first k tokens are exact
after k), so a budget >= L reproduces sequential sampling up to floating-point reduction order.

A solver is one class, written once (as a diffusers scheduler is): its block-plan type (the
fields a plan gives it, checked in `__post_init__`; pydantic gives it a JSON form), its pass
rules and one loop. A pass rule updates a small state after one network pass over tokens
`start..start+L-1`: the iterate `x`, each token's last move `prev`, and `start`, `active`, `bad`,
`iters`, `residual`, through a few operations the run gives it (`host`, `where`, `put`: see the
pass rules below), so that one rule serves every engine. The loop sets the state, runs passes and
reads the state every `check_every` passes. How a pass runs is the engine's business
(`engine.py`): eager (the cache sliced to the solved prefix, the state host values, each decision
read once per pass, the CPU default), static (fixed shapes, the state 0-d tensors on the device,
updated in place, passes after a stop are no-ops) or graph (static, captured as CUDA graphs).
`SOLVERS` registers the solvers: the plan union (`plan.BlockPlan`), `solve_block`'s dispatch and
the profile's candidates come from it.

To add a solver: its class here and its entry in SOLVERS, nothing else. The class gives its
`solver` tag and fields with their checks (`__post_init__`), `init`, `padding` (how far a static
pass runs past the last token), `length_field` (checked against the model's tokens),
`segment_length`, `segments`, `candidates` (what the profile tries), `short`, `max_iters` and
`coarse` (None where it has none), and `solve` with its pass rules (`Sliding` is the example of a
solver of its own).

The public API is `solve_block` (one block under one block plan, as sampling runs it) and
`jacobi_trace` (plain Jacobi iterations of one block with their residuals and, given the true
solution, their errors: what profiling and convergence figures read).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch

from . import engine as engines
from .model import MetaBlock
from .schema import STRICT_FIELDS, SchemaError
from .spec import Guidance

DIVERGENCE_BOUND = 1e4
Init = Literal["z", "zeros"]
INIT_NAMES = ("z", "zeros")
COARSE_NAMES = ("bf16",)


class PlanError(SchemaError):
    """An invalid plan, or a plan that does not fit the model or spec it is used with."""


def _check_iteration(tol, max_iters, init, check_every=1) -> None:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise PlanError(f"tol={tol!r}: must be a finite number >= 0")
    if max_iters is not None and (isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1):
        raise PlanError(f"max_iters={max_iters!r}: must be a positive integer or null")
    if init not in INIT_NAMES:
        raise PlanError(f"init={init!r}: allowed values are {', '.join(INIT_NAMES)}")
    _check_length(check_every, "check_every")


def _check_coarse(coarse, coarse_tol, tol) -> None:
    if coarse not in (None, *COARSE_NAMES):
        raise PlanError(f"coarse={coarse!r}: allowed values are {', '.join(COARSE_NAMES)} or null")
    if isinstance(coarse_tol, bool) or not isinstance(coarse_tol, (int, float)) or not math.isfinite(coarse_tol) \
            or (coarse is not None and coarse_tol < tol):
        raise PlanError(f"coarse_tol={coarse_tol!r}: must be a finite number >= tol ({tol:g})")


def _check_length(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlanError(f"{name}={value!r}: must be a positive integer")


def _short(bp, *length: str) -> str:
    """One line for logs: `gs_jacobi/L32/zeros/tol0.001/cap10/bf16to0.01`."""
    return "/".join([bp.solver, *length, bp.init, f"tol{bp.tol:g}", *([f"cap{bp.max_iters}"] if bp.max_iters else []),
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


# ---- pass rules: what one pass does to the state, on any engine --------------------------------------------------
# `run` is an engine's run (engine.py): the iterate `run.x` (batch, tokens, dim) and `run.prev` (tokens), the state
# (`start`, `active`, `bad`, `iters`, `cap`, `residual`, `tol`, `bound`: host values on eager, 0-d device tensors on
# static), and `run.live`: whether this pass counts (True on eager, which never runs a pass after a stop; the
# `active` flag on static, where passes after a stop run frozen until the host reads). A rule computes on
# tensors, takes values it decides with through `run.host` (read once on eager; on static they stay on the
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


def _checked(run, new, span):
    """(the tokens' values before the pass, whether the new values are finite and bounded on the real tokens,
    each token's move (worst sample and channel))."""
    old = span.read(run.x)
    inside = new.abs() <= run.bound  # also False for NaN and inf
    moved = (new - old).abs().amax(dim=(0, 2))
    if span.valid is not None:
        inside = inside | ~span.valid.view(1, -1, 1)
        moved = torch.where(span.valid, moved, 0.0)
    return old, run.host(inside.all()), moved


@pass_rule(moves_start=True, stops=False)
def step_pass(run, new, span) -> None:
    """One token from its exact inputs (the sequential sampler, and the divergence fallback); start += 1."""
    span.write(run.x, new, run.live)
    run.put(start=run.start + run.live)


def _steps(run, start: int, count: int, stats: BlockStats) -> None:
    """Tokens start..start+count-1 one by one, which is exact."""
    run.set(start=start, active=True)
    for _ in range(count):
        run.pass_(step_pass, 1)
    stats.passes += count


# ---- Gauss-Seidel over segments, Jacobi inside: sequential, Jacobi, GS-Jacobi --------------------------------------

class GaussSeidelJacobi:
    """The loop and pass rule of Sequential, Jacobi and GSJacobi: segments in order (Gauss-Seidel), Jacobi
    iterations inside each, after a bf16 start where the plan asks for one and the spec is float32."""

    padding = 0  # a segment never runs past the last token

    def segments(self, num_tokens: int) -> list[tuple[int, int]]:
        """[start, end) token ranges solved one after the other (tokens 1..T-1)."""
        L = self.segment_length(num_tokens)
        return [(s, min(s + L, num_tokens)) for s in range(1, num_tokens, L)]

    def solve(self, run, stats: BlockStats) -> None:
        T = run.num_tokens
        if self.segment_length(T) == 1:
            _steps(run, 1, T - 1, stats)
            stats.iterations.extend([1] * (T - 1))
            return
        every = run.reads_every(self.check_every)
        coarse = self.coarse is not None and not run.autocast
        for s, e in self.segments(T):
            n = e - s
            if n == 1:
                _steps(run, s, 1, stats)
                stats.iterations.append(1)
                continue
            if coarse:  # bf16 until the segment moves <= coarse_tol (at most n passes): a start, not a result
                with run.coarse():
                    self._iterate(run, s, n, self.coarse_tol, n, every, stats, coarse=True)
            cap = n if self.max_iters is None else min(self.max_iters, n)  # n iterations are already exact
            iters, bad, residual = self._iterate(run, s, n, self.tol, cap, every, stats)
            if bad:  # a diverging iterate: re-solve this segment token by token, which is exact
                _steps(run, s, n, stats)
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
        old, ok, moved = _checked(run, new, span)
        go = run.live & ok
        delta = run.host(moved.max())
        span.write(run.x, new, go, old)
        iters = run.iters + run.live
        run.put(bad=run.bad | (run.live & (ok ^ True)), iters=iters, residual=run.where(go, delta, run.residual),
                active=go & (delta > run.tol) & (iters < run.cap))


@dataclass(frozen=True)
class Sequential(GaussSeidelJacobi):
    """One token per step with the KV cache: exact."""

    solver: Literal["sequential"] = "sequential"

    __pydantic_config__ = STRICT_FIELDS
    init = "z"  # the iterate's start: every token is computed before a later one uses it
    max_iters = None  # one exact step per token: no cap, no bf16 start
    coarse = None
    length_field = None

    def segment_length(self, num_tokens: int) -> int:
        return 1

    @classmethod
    def candidates(cls, num_tokens: int, segment_lens, windows) -> list:
        return []  # the baseline every candidate is measured against

    def short(self) -> str:
        return "sequential"


# The Jacobi family stops a segment when no token moved more than `tol` in an iteration (max abs,
# worst sample) or after `max_iters` iterations (null: the segment length, where Jacobi is exact).
# `coarse` "bf16": iterate each segment under bf16 autocast until it moves <= `coarse_tol`, then on
# in float32 to `tol` (a no-op under a bf16 spec). `check_every`: on the static engine (CUDA), read
# the device-side convergence flags every k passes instead of every pass; passes after a segment
# converged are no-ops there, so k changes the cost, never the samples (not in the fingerprint).

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
    length_field = None

    def __post_init__(self):
        _check_iteration(self.tol, self.max_iters, self.init, self.check_every)
        _check_coarse(self.coarse, self.coarse_tol, self.tol)

    def segment_length(self, num_tokens: int) -> int:
        return num_tokens - 1

    @classmethod
    def candidates(cls, num_tokens: int, segment_lens, windows) -> list:
        """(pass length, make(init, tol, cap)) of each setting the profile tries."""
        L = num_tokens - 1
        return [(L, lambda init, tol, cap=None: cls(tol=tol, max_iters=cap, init=init))] if L in segment_lens else []

    def short(self) -> str:
        return _short(self)


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
    length_field = "segment_len"  # a plan checks it against the model's tokens

    def __post_init__(self):
        _check_length(self.segment_len, "segment_len")
        _check_iteration(self.tol, self.max_iters, self.init, self.check_every)
        _check_coarse(self.coarse, self.coarse_tol, self.tol)

    def segment_length(self, num_tokens: int) -> int:
        return self.segment_len

    @classmethod
    def candidates(cls, num_tokens: int, segment_lens, windows) -> list:
        return [(L, lambda init, tol, cap=None, L=L: cls(segment_len=L, tol=tol, max_iters=cap, init=init))
                for L in segment_lens if L < num_tokens - 1]

    def short(self) -> str:
        return _short(self, f"L{self.segment_len}")


# ---- the sliding window --------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Sliding:
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
    max_iters = None
    coarse = None
    length_field = "window"

    def __post_init__(self):
        _check_length(self.window, "window")
        _check_iteration(self.tol, None, self.init, self.check_every)

    @property
    def padding(self) -> int:
        return self.window  # a static window runs past the last token

    def segment_length(self, num_tokens: int) -> int:
        return self.window

    def segments(self, num_tokens: int) -> list[tuple[int, int]]:
        return [(1, num_tokens)]  # one stopping rule over the whole block

    @classmethod
    def candidates(cls, num_tokens: int, segment_lens, windows) -> list:
        return [(W, lambda init, tol, cap=None, W=W: cls(window=W, tol=tol, init=init))
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
            _steps(run, s, e - s, stats)
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
        computed from. (One quiet pass is not enough: a token can pause on its way, and on the demo
        model's tough block accepting after one pass put 5-95x `tol` into the block's output; the
        two-pass rule 4-12x, measured in docs/benchmarks.md.) Final tokens' keys/values stay in the
        cache, as ParaDiGMS does for diffusion, so no pass is spent on converged tokens (fixed segments
        wait for their slowest token). The run stops at the end of the block or on divergence (bad)."""
        old, ok, moved = _checked(run, new, span)
        go = run.live & ok
        prev = span.read(run.prev, dim=0)
        stable = (moved <= run.tol) & (prev <= run.tol)
        if span.valid is not None:
            stable = stable | ~span.valid
        L = new.shape[1]
        ar = torch.arange(L, device=new.device)
        # the first unstable token is final too
        advance = run.host(torch.where(stable, L, ar).min().clamp(max=L - 1) + 1)
        accepted = run.host(torch.where(ar < advance - 1, moved, 0.0).max())
        span.write(run.x, new, go, old)
        span.write(run.prev, moved, go, prev, dim=0)
        end = run.start + advance  # past the last token where a static window runs past it
        start = run.where(go, run.where(end < run.num_tokens, end, run.num_tokens), run.start)
        run.put(residual=run.where(go & (accepted > run.residual), accepted, run.residual), iters=run.iters + run.live,
                bad=run.bad | (run.live & (ok ^ True)), start=start, active=go & (start < run.num_tokens))


# The solver registry: the plan union (`plan.BlockPlan`), `solve_block` and the profile's candidates read it;
# a block plan whose type is not here runs on no engine.
SOLVERS = {cls.solver: cls for cls in (Sequential, Jacobi, GSJacobi, Sliding)}


# ---- one block -----------------------------------------------------------------------------------------------------

class BlockSolution(NamedTuple):
    x: torch.Tensor  # the block's input (B, T, D), model token order
    stats: BlockStats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def solve_block(block: MetaBlock, z: torch.Tensor, labels=None, plan=Sequential(), guidance: Guidance = Guidance(),
                divergence_bound: float = DIVERGENCE_BOUND, index: int = 0, engine="auto") -> BlockSolution:
    """Invert one block under one block plan: its output z (B, T, D) -> its input x, both in model
    token order, with the solver's statistics (`stats.seconds` includes waiting for the device).

    `engine`: "auto" (graph on CUDA, eager elsewhere), "eager", "static", "graph" (`engine.py`), or an
    engine object such as `engine.Static(capture=...)`."""
    t0 = time.perf_counter()
    if SOLVERS.get(getattr(plan, "solver", None)) is not type(plan):
        raise TypeError(f"{plan!r} is not a registered block plan (tarflow.solvers.SOLVERS: {', '.join(SOLVERS)})")
    runner = engines.resolve(engine, z.device)
    stats = BlockStats(index, plan.solver, plan.segment_length(z.shape[1]))
    run = runner.start(block, z, labels, guidance, divergence_bound, plan.init, plan.padding)
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
