"""Sequential vs plans on the same noise: wall time, passes, error, sample grids, convergence.

What the report's tables and figures show for one model; the pipeline runs it once after
generation, the nightly job for every configured model, each in a Ray task with the generate
stage's resources (`compare_in_worker`), so timings are those of a generate worker's device
and threads."""
from __future__ import annotations

import torch

from tarflow import Model, ModelRef, Plan, SamplingSpec, jacobi_trace, model_hash, sample_noise, solve_block, \
    time_in_turns

from .. import runtime
from ..config import Resources
from ..report.data import BlockResult, Curve, ModelResult, SamplerResult
from ..report.grid import grid_png


def comparison_batch(model: Model, spec: SamplingSpec, num_images: int, device):
    """(noise, labels) of sample ids 0..num_images-1, exactly as the generate stage draws them."""
    ids = range(num_images)
    noise = sample_noise(spec.seed, ids, model.num_tokens, model.token_dim).to(device)
    y = spec.labels_for(ids, model.config.num_classes)
    return noise, None if y is None else y.to(device)


def convergence_curves(model: Model, noise: torch.Tensor, y, plan: Plan, spec: SamplingSpec,
                       max_iters: int = 64, floor: float = 1e-6) -> list[Curve]:
    """Per block, max |x_k - x_(k-1)| of plain Jacobi over the whole block, from the plan's initial guess.

    Each block starts from its true input (the sequential solution of the blocks sampled before it), so
    the curves show each block's own contraction, not errors carried in from earlier blocks."""
    curves = []
    x = noise.float() * model.var.sqrt()
    with spec.autocast_context(noise.device.type):
        for i in reversed(range(len(model.blocks))):
            init = plan.blocks[i].init
            trace = jacobi_trace(model.blocks[i], x, y, init, spec.guidance, max_iters, floor=floor)
            curves.append(Curve(f"block {i} (init {init})", trace.residuals))
            x = solve_block(model.blocks[i], x, y, guidance=spec.guidance).x  # the exact input of the next block
    return curves


def compare_plans(model: Model, plans: dict[str, Plan], spec: SamplingSpec, num_images: int | None = None,
                  repeats: int = 1, name: str = "model", block_metrics: list[dict] | None = None,
                  grid_images: int = 16, curves_for: str | None = None) -> ModelResult:
    """Run sequential and each named plan on the same noise (sample ids 0..num_images-1, default one
    batch); the first plan's blocks go in the block table. `block_metrics`: per forward block
    {"crm_share", "igm_z", "igm_zeros"} from the profile, if any."""
    device = next(model.parameters()).device
    noise, y = comparison_batch(model, spec, num_images or spec.batch_size, device)
    timed = time_in_turns(model, noise, y, {"sequential": None, **plans}, repeats, spec)
    seq_out, seq_s = timed["sequential"]
    seq_images = torch.cat([o.images for o in seq_out]).cpu()
    runs = [SamplerResult("sequential", seq_s, sum(o.stats.passes for o in seq_out), 1.0, 0.0,
                      sum(o.stats.fallbacks for o in seq_out), grid_png=grid_png(seq_images[:grid_images]))]
    blocks: list[BlockResult] = []
    for plan_name, plan in plans.items():
        outs, s = timed[plan_name]
        images = torch.cat([o.images for o in outs]).cpu()
        err = (images - seq_images).abs().max().item()
        runs.append(SamplerResult(plan_name, s, sum(o.stats.passes for o in outs), seq_s / s if s > 0 else float("inf"),
                              err, sum(o.stats.fallbacks for o in outs), grid_png=grid_png(images[:grid_images])))
        if not blocks:
            by_block = {b.block: b for b in outs[0].stats.blocks}
            for i, bp in enumerate(plan.blocks):
                st = by_block[i]
                metrics = (block_metrics or [{}] * len(plan.blocks))[i]
                blocks.append(BlockResult(i, bp.solver, bp.segment_length(plan.num_tokens), bp.init,
                                          sum(st.iterations) / max(len(st.iterations), 1), st.passes,
                                          metrics.get("crm_share"), metrics.get("igm_z"), metrics.get("igm_zeros")))
    first = next(iter(plans.values()), None) if curves_for is None else plans[curves_for]
    curves = convergence_curves(model, noise[:4], None if y is None else y[:4], first, spec) if first else []
    return ModelResult(name, model_hash(model), str(device), spec.batch_size, runs, blocks, curves)


def _compare(model_ref: ModelRef, plans: dict[str, Plan], spec: SamplingSpec, **kwargs) -> ModelResult:
    model = model_ref.load().to(runtime.worker_device())
    return compare_plans(model, plans, spec, **kwargs)


def compare_in_worker(model_ref: ModelRef, plans: dict[str, Plan], spec: SamplingSpec, resources: Resources,
                      **kwargs) -> tuple[ModelResult, dict]:
    """`compare_plans` in a Ray task with `resources` (the generate stage's): (result, where it ran)."""
    runtime.connect()
    return runtime.run_task(_compare, model_ref, plans, spec, res=resources, **kwargs)
