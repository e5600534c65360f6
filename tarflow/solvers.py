"""Samplers: invert TarFlow blocks sequentially, by Jacobi, or by GS-Jacobi.

Inverting one block means solving the triangular system
    x_0 = z_0,   x_t = z_t * exp(a_t(x_<t)) + b_t(x_<t),   t = 1..T-1
in the block's permuted token order. Every solver here is Gauss-Seidel over
segments of tokens with a preallocated KV cache of the solved prefix, and Jacobi
inside a segment; they differ only in the segment length (1 = the sequential
sampler; T-1 = plain Jacobi). A segment of L tokens is exact after L Jacobi
iterations (the first k tokens are exact after k), so a budget >= L reproduces
sequential sampling up to floating-point reduction order.

To add a solver: write a function `(run, block_plan, stats) -> x` and register it
in SOLVERS, and add its name to `plan.SOLVER_NAMES`.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, NamedTuple

import torch

from .model import KVCache, MetaBlock, Model
from .plan import BlockPlan, Plan


class NonFiniteSampleError(FloatingPointError):
    """Sampling produced NaN or inf even after the sequential fallback."""


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance as the reference sampler applies it."""

    scale: float = 0.0
    attn_temp: float = 1.0
    annealed: bool = False
    what: str = "ab"

    def __post_init__(self):
        if self.what not in ("a", "b", "ab"):
            raise ValueError(f"guide_what={self.what!r}: allowed values are 'a', 'b', 'ab'")
        if self.attn_temp <= 0:
            raise ValueError(f"attn_temp={self.attn_temp!r}: must be > 0")

    @property
    def active(self) -> bool:
        return self.scale > 0

    def weights(self, num_tokens: int, device) -> torch.Tensor:
        """(T, 1) guidance weight of the step producing each token; annealed: g_t = t/(T-1)*scale."""
        t = torch.arange(num_tokens, device=device, dtype=torch.float32).unsqueeze(1)
        return t / (num_tokens - 1) * self.scale if self.annealed else torch.full_like(t, self.scale)


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


@dataclass
class SampleStats:
    blocks: list[BlockStats] = field(default_factory=list)  # in sampling order
    seconds: float = 0.0

    @property
    def passes(self) -> int:
        return sum(b.passes for b in self.blocks)

    @property
    def fallbacks(self) -> int:
        return sum(b.fallbacks for b in self.blocks)

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "passes": self.passes, "fallbacks": self.fallbacks,
                "blocks": [asdict(b) for b in self.blocks]}

    def summary(self) -> str:
        rows = [f"  block {b.block}: {b.solver:<10} L={b.segment_len:<4} passes={b.passes:<5} "
                f"max_iters/seg={max(b.iterations)} residual={b.residual:.1e} fallbacks={b.fallbacks} "
                f"{b.seconds:.3f}s" for b in self.blocks]
        return "\n".join([f"sampled in {self.seconds:.3f}s, {self.passes} passes, {self.fallbacks} fallbacks", *rows])


class SampleOutput(NamedTuple):
    images: torch.Tensor
    stats: SampleStats


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


def gauss_seidel_jacobi(run: BlockRun, bp: BlockPlan, stats: BlockStats, bound: float) -> torch.Tensor:
    """Segments in order (Gauss-Seidel), Jacobi iterations inside each segment."""
    x = run.initial(bp.init)
    for s, e in bp.segments(run.num_tokens):
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


def sliding_window(run: BlockRun, bp: BlockPlan, stats: BlockStats, bound: float) -> torch.Tensor:
    """Jacobi over a window of `segment_len` tokens that starts at the first unconverged token.

    After a pass the window's first token is exact (its inputs are final). A later token
    is final, up to `tol`, when every token before it in the window moved by <= tol in
    that pass: it was computed from final inputs. The window slides past final tokens and
    their keys/values stay in the cache, as ParaDiGMS does for diffusion, so no pass is
    spent on converged tokens (fixed segments wait for their slowest token). Progress is
    at least one token per pass, so tol=0 is exact."""
    x = run.initial(bp.init)
    T, W = run.num_tokens, bp.segment_len
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


SOLVERS: dict[str, Callable[[BlockRun, BlockPlan, BlockStats, float], torch.Tensor]] = {
    "sequential": gauss_seidel_jacobi,
    "jacobi": gauss_seidel_jacobi,
    "gs_jacobi": gauss_seidel_jacobi,
    "sliding": sliding_window,
}


def _labels_tensor(labels, batch: int, num_classes: int, device) -> torch.Tensor | None:
    if labels is None:
        return None
    y = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    if y.numel() == 1 and batch > 1:
        y = y.expand(batch)
    if y.numel() != batch:
        raise ValueError(f"got {y.numel()} labels for a batch of {batch}")
    if num_classes and bool((y >= num_classes).any()):
        raise ValueError(f"label {int(y.max())} out of range: the model has {num_classes} classes (use -1 for none)")
    return y


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def sample(model: Model, noise: torch.Tensor, labels=None, plan: Plan | None = None, guidance: float = 0.0,
           attn_temp: float = 1.0, annealed_guidance: bool = False, guide_what: str = "ab",
           autocast_dtype: torch.dtype | None = None) -> SampleOutput:
    """Sample images (B, C, H, W) in model space from noise (B, T, D) or (B, C, H, W).

    `plan=None` is exact sequential sampling. Under `autocast_dtype` (bf16 on GPU, as
    the reference samples) the network runs in that dtype while the iterates x stay
    float32: a plan's `tol` then measures convergence of the bf16 Jacobi map, and the
    distance to float32 sequential sampling is bf16 rounding, not `tol`."""
    cfg = Guidance(guidance, attn_temp, annealed_guidance, guide_what)
    T, D = model.num_tokens, model.token_dim
    if noise.dim() == 4:
        noise = model.patchify(noise)
    if noise.dim() != 3 or tuple(noise.shape[1:]) != (T, D):
        raise ValueError(f"noise must be (B, {T}, {D}) tokens or (B, C, H, W) images, got {tuple(noise.shape)}")
    plan = plan or Plan.sequential(len(model.blocks), T)
    plan.check_model(len(model.blocks), T)
    device = noise.device
    y = _labels_tensor(labels, noise.shape[0], model.config.num_classes, device)
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext())
    stats = SampleStats()
    start = time.perf_counter()
    x = noise.float() * model.var.sqrt()
    with autocast:
        for i in reversed(range(len(model.blocks))):
            bp = plan.blocks[i]
            bstats = BlockStats(i, bp.solver, bp.segment_length(T))
            t0 = time.perf_counter()
            run = BlockRun(model.blocks[i], x, y, cfg)
            x = run.block.permute(SOLVERS[bp.solver](run, bp, bstats, plan.divergence_bound))
            _sync(device)
            bstats.seconds = time.perf_counter() - t0
            stats.blocks.append(bstats)
            if not bool(torch.isfinite(x).all()):
                bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist()
                raise NonFiniteSampleError(f"block {i} produced NaN/inf for batch rows {bad[:10]}: "
                                           "the model or its guidance settings overflow")
    stats.seconds = time.perf_counter() - start
    return SampleOutput(model.unpatchify(x), stats)
