"""Sequential vs plans on the same noise: wall time, passes, error, sample grids, convergence, and
the speedup of the auto plan against batch size.

What the report's tables and figures show for one model; the pipeline runs it once after
generation, the nightly job for every configured model, each in a Ray task with the generate
stage's resources (`compare_in_worker`), so timings are those of a generate worker's device
and threads."""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from tarflow import Model, ModelRef, Plan, SamplingSpec, auto_plan, jacobi_trace, model_hash, sample_noise, \
    solve_block, time_in_turns
from tarflow.sampling import one_pass_per_block

from .. import runtime
from ..config import Resources
from ..report.data import BlockResult, Curve, ModelResult, SamplerResult, ScalingPoint
from ..report.grid import grid_png

# the scaling section profiles the model once per extra batch size: a reduced ladder (no fixed iteration
# caps), few calibration images and timings keep that a small part of a run
SCALING_TOLS = (1e-2, 1e-3, 1e-4, 1e-5)
SCALING_CALIBRATION_IMAGES = 4
SCALING_REPEATS = 2


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


def _bound_seconds(model: Model, noise: torch.Tensor, y, spec: SamplingSpec, repeats: int) -> float:
    """Best-of-`repeats` wall seconds of `one_pass_per_block` over `noise` in batches of the spec's size."""
    bound = functools.partial(one_pass_per_block, model, spec=spec)
    return time_in_turns(model, noise, y, {"bound": bound}, repeats, spec)["bound"][1]


def _point(batch_size: int, num_images: int, plan: Plan, sequential_s: float, plan_s: float, error: float,
           bound_s: float) -> ScalingPoint:
    return ScalingPoint(batch_size, sequential_s / num_images, plan_s / num_images, sequential_s / plan_s,
                        sequential_s / bound_s, plan.summary(), plan.evidence.get("fallback"), error)


def batch_scaling(model: Model, spec: SamplingSpec, batch_sizes, data: str | None, tol: float,
                  calib_images: int = SCALING_CALIBRATION_IMAGES, repeats: int = SCALING_REPEATS) -> list[ScalingPoint]:
    """Per batch size B: profile the model under `spec` at B (calibration `data`, as the profile stage),
    schedule the auto plan within `tol`, and time it against sequential and the one-pass bound on one
    batch (sample ids 0..B-1, as generation draws them), on the model's device and this process's threads."""
    device = next(model.parameters()).device
    points = []
    for B in batch_sizes:
        spec_b = replace(spec, batch_size=B)
        plan, _ = auto_plan(model, spec_b, tol, data, max(calib_images, B), str(device), tols=SCALING_TOLS, caps=(),
                            repeats=1)
        noise, y = comparison_batch(model, spec_b, B, device)
        timed = time_in_turns(model, noise, y, {"sequential": None, "plan": plan}, repeats, spec_b)
        (seq_out, seq_s), (plan_out, plan_s) = timed["sequential"], timed["plan"]
        error = (torch.cat([o.images for o in plan_out]) - torch.cat([o.images for o in seq_out])).abs().max().item()
        points.append(_point(B, B, plan, seq_s, plan_s, error, _bound_seconds(model, noise, y, spec_b, repeats)))
    return points


@dataclass(frozen=True)
class Scaling:
    """What the report's speedup-vs-batch-size section measures: the auto plan within `tol` (profiled on
    `data`) at each of `batch_sizes`; `run_plan` names the compared plan that is already the auto plan at
    the spec's batch size, whose point comes from the comparison instead of a second profile."""

    batch_sizes: tuple[int, ...]
    data: str | None
    tol: float
    run_plan: str | None = None


def _compare(model_ref: ModelRef, plans: dict[str, Plan], spec: SamplingSpec, scaling: Scaling | None = None,
             num_images: int | None = None, **kwargs) -> ModelResult:
    model = model_ref.load().to(runtime.worker_device())
    n = num_images or spec.batch_size
    result = compare_plans(model, plans, spec, n, **kwargs)
    if scaling is not None:
        points = []
        if scaling.run_plan is not None:
            seq, planned = result.runs[0], result.run(scaling.run_plan)
            noise, y = comparison_batch(model, spec, n, next(model.parameters()).device)
            points.append(_point(spec.batch_size, n, plans[scaling.run_plan], seq.seconds, planned.seconds,
                                 planned.max_abs_error, _bound_seconds(model, noise, y, spec, SCALING_REPEATS)))
        others = sorted(set(scaling.batch_sizes) - {p.batch_size for p in points})
        result.scaling = sorted(points + batch_scaling(model, spec, others, scaling.data, scaling.tol),
                                key=lambda p: p.batch_size)
    return result


def compare_in_worker(model_ref: ModelRef, plans: dict[str, Plan], spec: SamplingSpec, resources: Resources,
                      scaling: Scaling | None = None, **kwargs) -> tuple[ModelResult, dict]:
    """`compare_plans` (and with `scaling`, `batch_scaling`) in a Ray task with `resources` (the generate
    stage's): (result, the task's placement)."""
    runtime.connect()
    return runtime.run_task(_compare, model_ref, plans, spec, scaling, res=resources, **kwargs)
