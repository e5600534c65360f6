"""Sampling: noise -> images through every block, under a plan and a sampling spec.

`sample` inverts the blocks in sampling order (last forward block first), each with the
solver its block plan names, then applies the spec's denoising. `sample_ids` is what one
batch of a run computes: noise from (seed, id), labels from the policy, then `sample`.
`time_in_turns` is the one timer the report, the scheduler and the benchmarks use;
`one_pass_per_block` what they compare plans with as the bound.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch

from .denoise import denoise
from .model import Model
from .noise import sample_noise
from .plan import Plan
from .engine import EagerRun
from .solvers import BlockStats, solve_block
from .spec import SamplingSpec

DEFAULT_SPEC = SamplingSpec()


class NonFiniteSampleError(FloatingPointError):
    """Sampling produced NaN or inf even after the sequential fallback."""


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
    labels: torch.Tensor | None  # int64 (B,) the images were conditioned on (-1: none); None: unconditional
    stats: SampleStats


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


@torch.inference_mode()
def sample(model: Model, noise: torch.Tensor, labels=None, plan: Plan | None = None,
           spec: SamplingSpec = DEFAULT_SPEC, engine: str = "auto") -> SampleOutput:
    """Images in model space from noise, every block inverted under the plan.

    Under autocast (bf16 on GPU, as the reference samples) the network runs in that dtype while the
    iterates stay float32: a plan's `tol` then measures convergence of the bf16 Jacobi map, and the
    distance to float32 sequential sampling is bf16 rounding, not `tol`.

    Args:
        model: the TarFlow model.
        noise: (B, T, D) tokens or (B, C, H, W) images, standard normal.
        labels: class ids (B,) or one id for the batch, -1 for unconditional rows; None: unconditional.
        plan: a block plan per block; None: exact sequential sampling.
        spec: the map (guidance, autocast dtype) and the denoising after it (`noise_std` set:
            `spec.for_model`).
        engine: how passes run (`solvers.solve_block`; "auto": CUDA graphs on CUDA, eager elsewhere).

    Returns:
        SampleOutput: images (B, C, H, W), the labels they were conditioned on (None: unconditional)
        and the per-block solver statistics in sampling order.
    """
    T, D = model.num_tokens, model.token_dim
    if noise.dim() == 4:
        noise = model.patchify(noise)
    if noise.dim() != 3 or tuple(noise.shape[1:]) != (T, D):
        raise ValueError(f"noise must be (B, {T}, {D}) tokens or (B, C, H, W) images, got {tuple(noise.shape)}")
    plan = plan or Plan.sequential(len(model.blocks), T)
    plan.check_model(len(model.blocks), T)
    if spec.denoise.active and spec.denoise.noise_std is None:
        raise ValueError("spec.denoise is on but has no noise_std: resolve the spec for the model first "
                         "(SamplingSpec.for_model)")
    device = noise.device
    y = _labels_tensor(labels, noise.shape[0], model.config.num_classes, device)
    stats = SampleStats()
    start = time.perf_counter()
    x = noise.float() * model.var.sqrt()
    with spec.autocast_context(device.type):
        for i in reversed(range(len(model.blocks))):
            x, bstats = solve_block(model.blocks[i], x, y, plan.blocks[i], spec.guidance, plan.divergence_bound, i,
                                    engine)
            stats.blocks.append(bstats)
            if not bool(torch.isfinite(x).all()):
                bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist()
                raise NonFiniteSampleError(f"block {i} produced NaN/inf for batch rows {bad[:10]}: "
                                           "the model or its guidance settings overflow")
    images = model.unpatchify(x)
    if spec.denoise.active:
        images = denoise(model, images, y, noise_std=spec.denoise.noise_std, lr_multiplier=spec.denoise.multiplier)
    stats.seconds = time.perf_counter() - start
    return SampleOutput(images, y, stats)


@torch.inference_mode()
def one_pass_per_block(model: Model, noise: torch.Tensor, labels=None,
                       spec: SamplingSpec = DEFAULT_SPEC) -> torch.Tensor:
    """One parallel pass over all T-1 tokens of every block, from the z start (not a sample): every
    parallel plan needs at least this many network passes, so its time bounds what any plan can gain."""
    x = noise.float() * model.var.sqrt()
    T = model.num_tokens
    y = _labels_tensor(labels, noise.shape[0], model.config.num_classes, noise.device)
    with spec.autocast_context(noise.device.type):
        for block in reversed(model.blocks):
            run = EagerRun(block, x, y, spec.guidance)
            x = block.permute(torch.cat([run.z[:, :1], run.update(run.x, 1, T)], dim=1))
    return x


def sample_ids(model: Model, spec: SamplingSpec, ids, plan: Plan | None = None, device=None) -> SampleOutput:
    """Samples `ids` of the run `spec` describes, in one batch. The same id gets the same image however
    ids are batched (up to floating-point reduction order when the batch size differs), on any machine.

    Args:
        model: the TarFlow model.
        spec: the run's sampling spec: its seed and label policy decide each id's noise and label.
        ids: the sample ids (a range or a sequence of ints).
        plan: as in `sample`; None: exact sequential sampling.
        device: where to sample (default: where the model is).

    Returns:
        SampleOutput of `sample`, its labels those the policy gives the ids.
    """
    device = device or next(model.parameters()).device
    noise = sample_noise(spec.seed, ids, model.num_tokens, model.token_dim).to(device)
    y = spec.labels_for(ids, model.config.num_classes)
    return sample(model, noise, None if y is None else y.to(device), plan, spec)


def time_in_turns(model, noise, labels, plans: dict, repeats: int, spec: SamplingSpec = DEFAULT_SPEC) -> dict:
    """{name: ([output per batch], best wall seconds)} of each plan (None: sequential; or a callable
    (noise, labels) -> anything, e.g. another version's sampler or one pass per block), sampling `noise` in
    batches of `spec.batch_size`: the one timer of the report, the scheduler and the benchmarks.

    Round-robin over the samplers, so a burst of load on a shared machine hits them alike, and
    the minimum over repeats, the least noisy estimate of what the code costs."""
    B = spec.batch_size
    outs, best = {}, {name: math.inf for name in plans}
    for _ in range(repeats):
        for name, plan in plans.items():
            outs[name], total = [], 0.0
            for s in range(0, noise.shape[0], B):
                y = None if labels is None else labels[s:s + B]
                start = time.perf_counter()
                outs[name].append(plan(noise[s:s + B], y) if callable(plan) else sample(model, noise[s:s + B], y,
                                                                                         plan, spec))
                if noise.device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
                    torch.cuda.synchronize(noise.device)
                total += time.perf_counter() - start
            best[name] = min(best[name], total)
    return {name: (outs[name], best[name]) for name in plans}
