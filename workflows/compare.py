"""Sequential sampling vs plans on the same noise: wall time, passes, error, sample grids, convergence.

What the report's tables and figures show for one model; the pipeline runs it once after
planning, the nightly job for every configured model."""
from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch

from tarflow import Model, Plan, model_hash, sample
from tarflow.noise import sample_noise
from tarflow.plan import BlockPlan
from tarflow.solvers import BlockRun, BlockStats, Guidance, gauss_seidel_jacobi

from .generate import labels_for
from .report import BlockResult, Curve, ModelResult, RunResult, grid_png


@contextmanager
def torch_threads(threads: int | None):
    """Run the block with `threads` torch threads (None: unchanged), then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def comparison_batch(model: Model, num_images: int, seed: int, labels="uniform"):
    """(noise, labels) of sample ids 0..num_images-1, exactly as the generate stage draws them."""
    ids = range(num_images)
    noise = sample_noise(seed, ids, model.num_tokens, model.token_dim)
    num_classes = model.config.num_classes
    policy = labels if num_classes else "none"
    y = None if policy == "none" else torch.as_tensor(labels_for(ids, policy, num_classes))
    return noise, y


def time_in_turns(model, noise, labels, plans: dict, repeats: int, batch_size: int | None = None,
                  **sample_kwargs) -> dict:
    """{name: ([SampleOutput per batch], best wall seconds)} of each plan (None: sequential),
    sampling `noise` in batches of `batch_size` (None: one batch).

    Round-robin over the samplers, so a burst of load on a shared machine hits them alike, and
    the minimum over repeats, the least noisy estimate of what the code costs."""
    B = batch_size or noise.shape[0]
    outs, best = {}, {name: math.inf for name in plans}
    for _ in range(repeats):
        for name, plan in plans.items():
            outs[name], total = [], 0.0
            for s in range(0, noise.shape[0], B):
                y = None if labels is None else labels[s:s + B]
                start = time.perf_counter()
                outs[name].append(sample(model, noise[s:s + B], y, plan=plan, **sample_kwargs))
                total += time.perf_counter() - start
            best[name] = min(best[name], total)
    return {name: (outs[name], best[name]) for name in plans}


def convergence_curves(model: Model, noise: torch.Tensor, y, plan: Plan, guidance: dict,
                       max_iters: int = 64, floor: float = 1e-6) -> list[Curve]:
    """Per block, max |x_k - x_(k-1)| of plain Jacobi over the whole block, from the plan's initial guess.

    Each block starts from its true input (the sequential solution of the blocks sampled before it), so
    the curves show each block's own contraction, not errors carried in from earlier blocks."""
    cfg = Guidance(guidance.get("guidance", 0.0), guidance.get("attn_temp", 1.0),
                   guidance.get("annealed_guidance", False), guidance.get("guide_what", "ab"))
    T = model.num_tokens
    curves = []
    with torch.inference_mode():
        x = noise.float() * model.var.sqrt()
        for i in reversed(range(len(model.blocks))):
            run = BlockRun(model.blocks[i], x, y, cfg)
            it = run.initial(plan.blocks[i].init)
            values = []
            for _ in range(min(max_iters, T - 1)):
                new = run.update(it, 1, T)
                delta = (new - it[:, 1:]).abs().max().item()
                it[:, 1:] = new
                values.append(delta)
                if delta <= floor:
                    break
            curves.append(Curve(f"block {i} (init {plan.blocks[i].init})", values))
            # the exact block output feeds the next block, as in sequential sampling
            exact = gauss_seidel_jacobi(BlockRun(model.blocks[i], x, y, cfg), BlockPlan("sequential"),
                                        BlockStats(i, "sequential", 1), math.inf)
            x = model.blocks[i].permute(exact)
    return curves


def compare_plans(model: Model, plans: dict[str, Plan], num_images: int = 16, seed: int = 0, labels="uniform",
                  guidance: dict | None = None, repeats: int = 1, name: str = "model",
                  block_metrics: list[dict] | None = None, grid_images: int = 16,
                  curves_for: str | None = None, threads: int | None = None) -> ModelResult:
    """Run sequential and each named plan on the same noise; the first plan's blocks go in the block table.

    `block_metrics`: per forward block {"crm_share", "igm_z", "igm_zeros"} from the profile, if any.
    `threads`: torch threads while measuring, e.g. those of one generate actor, so the timings are
    what the pool's workers see (and a busy machine is not oversubscribed by this process)."""
    with torch_threads(threads):
        return _compare(model, plans, num_images, seed, labels, guidance or {}, repeats, name, block_metrics,
                        grid_images, curves_for)


def _compare(model, plans, num_images, seed, labels, guidance, repeats, name, block_metrics, grid_images,
             curves_for) -> ModelResult:
    noise, y = comparison_batch(model, num_images, seed, labels)
    timed = time_in_turns(model, noise, y, {"sequential": None, **plans}, repeats, **guidance)
    (seq,), seq_s = timed["sequential"]
    runs = [RunResult("sequential", seq_s, seq.stats.passes, 1.0, 0.0, seq.stats.fallbacks,
                      grid_png=grid_png(seq.images[:grid_images]))]
    blocks: list[BlockResult] = []
    for plan_name, plan in plans.items():
        (out,), s = timed[plan_name]
        err = (out.images - seq.images).abs().max().item()
        runs.append(RunResult(plan_name, s, out.stats.passes, seq_s / s if s > 0 else float("inf"), err,
                              out.stats.fallbacks, grid_png=grid_png(out.images[:grid_images])))
        if not blocks:
            by_block = {b.block: b for b in out.stats.blocks}
            for i, bp in enumerate(plan.blocks):
                st = by_block[i]
                metrics = (block_metrics or [{}] * len(plan.blocks))[i]
                blocks.append(BlockResult(i, bp.solver, bp.segment_length(plan.num_tokens), bp.init,
                                          sum(st.iterations) / max(len(st.iterations), 1), st.passes,
                                          metrics.get("crm_share"), metrics.get("igm_z"), metrics.get("igm_zeros")))
    first = next(iter(plans.values()), None) if curves_for is None else plans[curves_for]
    curves = convergence_curves(model, noise[:4], None if y is None else y[:4], first, guidance) if first else []
    return ModelResult(name, model_hash(model), str(noise.device), num_images, runs, blocks, curves)
