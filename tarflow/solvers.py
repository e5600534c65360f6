"""Block solvers: invert one TarFlow block sequentially, by Jacobi, GS-Jacobi or a sliding window.

Inverting one block means solving the triangular system
    x_0 = z_0,   x_t = z_t * exp(a_t(x_<t)) + b_t(x_<t),   t = 1..T-1
in the block's permuted token order. Every solver here is Gauss-Seidel over
segments of tokens with a preallocated KV cache of the solved prefix, and Jacobi
inside a segment; they differ only in the segment length (1 = the sequential
sampler; T-1 = plain Jacobi). A segment of L tokens is exact after L Jacobi
iterations (the first k tokens are exact after k), so a budget >= L reproduces
sequential sampling up to floating-point reduction order.

The public API is `solve_block` (one block under one block plan, as sampling runs it)
and `jacobi_trace` (plain Jacobi iterations of one block with their residuals and, given
the true solution, their errors: what profiling and convergence figures read).
To add a solver: its block-plan type in `plan.py`, its function `(run, block_plan, stats,
divergence_bound) -> x` in SOLVERS, and its driver over the static passes in `engine.py`.

`engine` picks how the passes run (`engine.py`): "eager" here, with the cache sliced to the
solved prefix and convergence read on the host after every pass; "static" / "graph" with
fixed shapes, device-side flags read every `check_every` passes, captured as CUDA graphs for
"graph". "auto" (the default) is graph on CUDA, eager elsewhere.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from . import engine as static
from .model import CAUSAL, KVCache, MetaBlock
from .plan import GSJacobi, Jacobi, Sequential, Sliding, segments
from .spec import Guidance

DIVERGENCE_BOUND = 1e4


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


class BlockRun:
    """One block's inversion state: its input z (permuted), KV cache and conditioning."""

    def __init__(self, block: MetaBlock, z: torch.Tensor, labels, guidance: Guidance,
                 cache_dtype: torch.dtype | None = None):
        self.block = block
        self.z = block.permute(z)
        B, T, _ = self.z.shape
        self.batch, self.num_tokens = B, T
        self.pos = block.permute(block.pos_embed, 0)
        self.guidance = guidance
        self.cond, self.q_scale = static.conditioning(block, labels, guidance, B, z.device)
        if guidance.active:
            self.g = guidance.weights(T, z.device)
        self.cache = KVCache(len(block.attn_blocks), T, cache_dtype)

    def update(self, x: torch.Tensor, s: int, e: int) -> torch.Tensor:
        """New values of tokens s..e-1 from the current x (inputs: tokens s-1..e-2)."""
        inp = x[:, s - 1 : e - 1]
        L = e - s
        if self.guidance.active:
            inp = torch.cat([inp, inp])
        # query i (position s-1+i) sees cached keys 0..s-1+i
        if L == 1:
            mask = None
        elif s == 1:
            mask = CAUSAL
        else:
            mask = torch.ones(L, s - 1 + L, dtype=torch.bool, device=x.device).tril(s - 1)
        a, b = self.block.params(inp, self.pos[s - 1 : e - 1], self.cond, mask, self.cache, s - 1, self.q_scale)
        if self.guidance.active:
            a, b = self.guidance.combine(a, b, self.g[s:e])
        return self.z[:, s:e] * a.float().exp() + b.float()

    def initial(self, init: str) -> torch.Tensor:
        x = self.z.clone() if init == "z" else torch.zeros_like(self.z)
        x[:, 0] = self.z[:, 0]
        return x


def _sequential_steps(run: BlockRun, x: torch.Tensor, s: int, e: int) -> None:
    for t in range(s, e):
        x[:, t : t + 1] = run.update(x, t, t + 1)


def _coarse_iterations(run: BlockRun, x: torch.Tensor, s: int, e: int, bp, stats: BlockStats, bound: float) -> None:
    """Jacobi on tokens s..e-1 under bf16 autocast until they move <= coarse_tol (at most e-s passes):
    a start for the float32 iterations, which alone decide exactness and `tol`."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        for _ in range(e - s):
            new = run.update(x, s, e)
            stats.passes += 1
            stats.coarse_passes += 1
            stats.syncs += 2
            if not bool((new.abs() <= bound).all()):
                return  # leave the diverging iterate to the float32 loop's fallback
            delta = (new - x[:, s:e]).abs().max().item()
            x[:, s:e] = new
            if delta <= bp.coarse_tol:
                return


def gauss_seidel_jacobi(run: BlockRun, bp, stats: BlockStats, bound: float) -> torch.Tensor:
    """Segments in order (Gauss-Seidel), Jacobi iterations inside each (after a bf16 start, if
    the plan asks for one and the spec is float32)."""
    x = run.initial(bp.init)
    coarse = getattr(bp, "coarse", None) and not torch.is_autocast_enabled(x.device.type)
    for s, e in segments(bp, run.num_tokens):
        n = e - s
        if n == 1:
            _sequential_steps(run, x, s, e)
            stats.iterations.append(1)
            stats.passes += 1
            continue
        if coarse:
            _coarse_iterations(run, x, s, e, bp, stats, bound)
        cap = n if bp.max_iters is None else min(bp.max_iters, n)  # n iterations are already exact
        for it in range(1, cap + 1):
            new = run.update(x, s, e)
            stats.passes += 1
            stats.syncs += 2
            if not bool((new.abs() <= bound).all()):  # also catches NaN/inf
                # a diverging iterate: re-solve this segment token by token, which is exact
                _sequential_steps(run, x, s, e)
                stats.passes += n
                stats.fallbacks += 1
                delta = 0.0
                break
            delta = (new - x[:, s:e]).abs().flatten(1).amax(1).max().item()  # per-sample max, worst sample
            x[:, s:e] = new
            if it == n:
                delta = 0.0  # n iterations solve n tokens exactly: the last update is no error estimate
            if delta <= bp.tol:
                break
        stats.iterations.append(it)
        stats.residual = max(stats.residual, delta)
    return x


def sliding_window(run: BlockRun, bp: Sliding, stats: BlockStats, bound: float) -> torch.Tensor:
    """Jacobi over a window of `bp.window` tokens that starts at the first unconverged token.

    After a pass the window's first token is exact (its inputs are final). A later token
    is final, up to `tol`, when every token before it in the window moved by <= tol in
    this pass and in the one before: its inputs were then stable over the two iterates it
    and its cached keys/values were computed from. (One quiet pass is not enough: a token
    can pause on its way, and on the demo model's tough block accepting after one pass put
    5-95x `tol` into the block's output; the two-pass rule 4-12x, measured in
    docs/benchmarks.md.) The window slides past final tokens and their keys/values stay in
    the cache, as ParaDiGMS does for diffusion, so no pass is spent on converged tokens
    (fixed segments wait for their slowest token). Progress is at least one token per
    pass, so tol=0 is exact."""
    x = run.initial(bp.init)
    T, W = run.num_tokens, bp.window
    prev = torch.full((T,), math.inf, device=x.device)  # each token's move in its previous pass
    s = 1
    while s < T:
        e = min(s + W, T)
        new = run.update(x, s, e)
        stats.passes += 1
        stats.syncs += 2
        if not bool((new.abs() <= bound).all()):  # also catches NaN/inf
            _sequential_steps(run, x, s, e)
            stats.passes += e - s
            stats.fallbacks += 1
            s = e
            continue
        moved = (new - x[:, s:e]).abs().amax(dim=(0, 2))  # per token, worst sample and channel
        x[:, s:e] = new
        unstable = ((moved > bp.tol) | (prev[s:e] > bp.tol)).nonzero()
        prev[s:e] = moved
        advance = min(e - s, int(unstable[0]) + 1) if len(unstable) else e - s
        if advance > 1:
            stats.residual = max(stats.residual, moved[: advance - 1].max().item())
        s += advance
    stats.iterations.append(stats.passes)
    return x


SOLVERS: dict[type, Callable[[BlockRun, object, BlockStats, float], torch.Tensor]] = {
    Sequential: gauss_seidel_jacobi,
    Jacobi: gauss_seidel_jacobi,
    GSJacobi: gauss_seidel_jacobi,
    Sliding: sliding_window,
}


class BlockSolution(NamedTuple):
    x: torch.Tensor  # the block's input (B, T, D), model token order
    stats: BlockStats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_engine(engine: str, device: torch.device) -> str:
    """The engine `engine` names on `device` ("auto": graph on CUDA, eager elsewhere)."""
    if engine not in static.ENGINES:
        raise ValueError(f"engine={engine!r}: allowed values are {', '.join(static.ENGINES)}")
    if engine == "auto":
        return "graph" if device.type == "cuda" else "eager"
    if engine == "graph" and device.type != "cuda":
        raise ValueError(f"engine='graph' captures CUDA graphs; the device here is {device.type}")
    return engine


@torch.inference_mode()
def solve_block(block: MetaBlock, z: torch.Tensor, labels=None, plan=Sequential(), guidance: Guidance = Guidance(),
                divergence_bound: float = DIVERGENCE_BOUND, index: int = 0, engine: str = "auto") -> BlockSolution:
    """Invert one block under one block plan: its output z (B, T, D) -> its input x, both in model
    token order, with the solver's statistics (`stats.seconds` includes waiting for the device)."""
    t0 = time.perf_counter()
    T = z.shape[1]
    stats = BlockStats(index, plan.solver, plan.segment_length(T), engine=resolve_engine(engine, z.device))
    autocast = torch.is_autocast_enabled(z.device.type)
    # a bf16 start is polished in float32: the cache must hold float32 keys/values throughout
    cache_dtype = torch.float32 if getattr(plan, "coarse", None) and not autocast else None
    if stats.engine == "eager":
        run = BlockRun(block, z, labels, guidance, cache_dtype)
        x = SOLVERS[type(plan)](run, plan, stats, divergence_bound)
    else:
        x = static.solve(block, z, labels, plan, guidance, divergence_bound, stats)
    x = block.permute(x)
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
    run = BlockRun(block, z, labels, guidance)
    T = run.num_tokens
    truth = None if solution is None else block.permute(solution.float())
    x = run.initial(init)
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
