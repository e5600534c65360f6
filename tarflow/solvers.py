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
divergence_bound) -> x` in SOLVERS.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from .model import KVCache, MetaBlock
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


class BlockRun:
    """One block's inversion state: its input z (permuted), KV cache and conditioning."""

    def __init__(self, block: MetaBlock, z: torch.Tensor, labels, guidance: Guidance):
        self.block = block
        self.z = block.permute(z)
        B, T, _ = self.z.shape
        self.batch, self.num_tokens = B, T
        self.pos = block.permute(block.pos_embed, 0)
        self.guidance = guidance
        cond = block.class_embedding(labels, B)
        self.q_scale = None
        if guidance.active:
            # conditional and unconditional passes share one forward over a 2B batch
            if isinstance(cond, torch.Tensor):
                cond = torch.cat([cond, block.class_embedding(None, B)])
            if guidance.attn_temp != 1.0:
                scale = torch.ones(2 * B, 1, 1, 1, device=z.device)
                scale[B:] = 1.0 / guidance.attn_temp
                self.q_scale = scale
            self.g = guidance.weights(T, z.device)
        self.cond = cond
        self.cache = KVCache(len(block.attn_blocks), T)

    def update(self, x: torch.Tensor, s: int, e: int) -> torch.Tensor:
        """New values of tokens s..e-1 from the current x (inputs: tokens s-1..e-2)."""
        inp = x[:, s - 1 : e - 1]
        L = e - s
        if self.guidance.active:
            inp = torch.cat([inp, inp])
        # query i (position s-1+i) sees cached keys 0..s-1+i
        mask = None if L == 1 else torch.ones(L, s - 1 + L, dtype=torch.bool, device=x.device).tril(s - 1)
        a, b = self.block.params(inp, self.pos[s - 1 : e - 1], self.cond, mask, self.cache, s - 1, self.q_scale)
        if self.guidance.active:
            (a_c, a_u), (b_c, b_u) = a.chunk(2), b.chunk(2)
            g = self.g[s:e]
            a = a_c + g * (a_c - a_u) if "a" in self.guidance.what else a_c
            b = b_c + g * (b_c - b_u) if "b" in self.guidance.what else b_c
        return self.z[:, s:e] * a.float().exp() + b.float()

    def initial(self, init: str) -> torch.Tensor:
        x = self.z.clone() if init == "z" else torch.zeros_like(self.z)
        x[:, 0] = self.z[:, 0]
        return x


def _sequential_steps(run: BlockRun, x: torch.Tensor, s: int, e: int) -> None:
    for t in range(s, e):
        x[:, t : t + 1] = run.update(x, t, t + 1)


def gauss_seidel_jacobi(run: BlockRun, bp, stats: BlockStats, bound: float) -> torch.Tensor:
    """Segments in order (Gauss-Seidel), Jacobi iterations inside each."""
    x = run.initial(bp.init)
    for s, e in segments(bp, run.num_tokens):
        n = e - s
        if n == 1:
            _sequential_steps(run, x, s, e)
            stats.iterations.append(1)
            stats.passes += 1
            continue
        cap = n if bp.max_iters is None else min(bp.max_iters, n)  # n iterations are already exact
        for it in range(1, cap + 1):
            new = run.update(x, s, e)
            stats.passes += 1
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
    that pass: it was computed from final inputs. The window slides past final tokens and
    their keys/values stay in the cache, as ParaDiGMS does for diffusion, so no pass is
    spent on converged tokens (fixed segments wait for their slowest token). Progress is
    at least one token per pass, so tol=0 is exact."""
    x = run.initial(bp.init)
    T, W = run.num_tokens, bp.window
    s = 1
    while s < T:
        e = min(s + W, T)
        new = run.update(x, s, e)
        stats.passes += 1
        if not bool((new.abs() <= bound).all()):  # also catches NaN/inf
            _sequential_steps(run, x, s, e)
            stats.passes += e - s
            stats.fallbacks += 1
            s = e
            continue
        moved = (new - x[:, s:e]).abs().amax(dim=(0, 2))  # per token, worst sample and channel
        x[:, s:e] = new
        big = (moved > bp.tol).nonzero()
        advance = min(e - s, int(big[0]) + 1) if len(big) else e - s
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


@torch.inference_mode()
def solve_block(block: MetaBlock, z: torch.Tensor, labels=None, plan=Sequential(), guidance: Guidance = Guidance(),
                divergence_bound: float = DIVERGENCE_BOUND, index: int = 0) -> BlockSolution:
    """Invert one block under one block plan: its output z (B, T, D) -> its input x, both in model
    token order, with the solver's statistics (`stats.seconds` includes waiting for the device)."""
    t0 = time.perf_counter()
    run = BlockRun(block, z, labels, guidance)
    stats = BlockStats(index, plan.solver, plan.segment_length(run.num_tokens))
    x = block.permute(SOLVERS[type(plan)](run, plan, stats, divergence_bound))
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
