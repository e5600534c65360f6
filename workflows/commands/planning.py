"""`tarflow-gs profile` and `tarflow-gs plan`: measure a model's blocks, then compute (or parse) a plan."""
from __future__ import annotations

import json

import click

from tarflow import PlanError, load_checkpoint, model_hash
from tarflow.plan import Plan


def _load_model(checkpoint: str, in_channels: int):
    if checkpoint == "demo":
        from tarflow import demo_checkpoint

        checkpoint = str(demo_checkpoint())
    return load_checkpoint(checkpoint, in_channels=in_channels), checkpoint


def _int_list(text: str, name: str) -> list[int]:
    try:
        values = json.loads(text)
    except json.JSONDecodeError:
        values = None
    if not isinstance(values, list) or not all(isinstance(v, int) for v in values):
        raise click.BadParameter(f"{text!r}: expected a list of integers such as [8,1,1,1]", param_hint=name)
    return values


@click.command("profile")
@click.option("--checkpoint", required=True, help="Model: .safetensors / raw .pth path, or 'demo'.")
@click.option("--in-channels", default=3, show_default=True, help="Image channels (only read for raw .pth files).")
@click.option("--data", default=None, help="Calibration images: dataset name (mnist5k, digits) or image folder. "
                                         "Default: the model's own sequential samples.")
@click.option("--num-images", default=8, show_default=True, help="Calibration images (rounded up to whole batches).")
@click.option("--batch-size", default=1, show_default=True, help="The batch size the plan is for: solves and "
                                                                  "timings run at it.")
@click.option("--guidance", "guidance", multiple=True, type=float, default=(0.0,), show_default=True,
              help="Guidance scale(s) to profile; repeat for several.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--seed", default=0, show_default=True)
@click.option("--num-cpus", default=None, type=int, help="CPUs (and torch threads) per block task "
                                                         "(default: this process's torch threads).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write profile.json.")
def profile_command(checkpoint, in_channels, data, num_images, batch_size, guidance, device, seed, num_cpus, out):
    """Profile each block in a Ray task: CRM/IGM, convergence and cost on this hardware."""
    import ray

    from ..profile import profile_model

    model, path = _load_model(checkpoint, in_channels)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    prof = profile_model(model, data=data, num_images=num_images, batch_size=batch_size, guidance=list(guidance),
                         device=device, seed=seed, num_cpus=num_cpus, checkpoint=path)
    prof.save(out)
    for case in prof.cases:
        click.echo(f"guidance {case.guidance}: CRM share per block "
                   + ", ".join(f"{b.block}: {100 * b.crm_share:.1f}%" for b in case.blocks))
    click.echo(f"profile written to {out} ({prof.seconds:.1f}s)")


@click.command("plan")
@click.option("--profile", "profile_path", type=click.Path(dir_okay=False), help="profile.json from "
                                                                                  "`tarflow-gs profile`.")
@click.option("--tol", default=1e-3, show_default=True, help="Max abs error of final images vs sequential "
                                                              "sampling (model space).")
@click.option("--guidance", default=None, type=float, help="Which profiled guidance scale (default: the first).")
@click.option("--hand", default=None, help="A paper-style plan in [Stack-GS-J-Else] notation, e.g. 7-8-32-10.")
@click.option("--paper-lists", nargs=3, default=None, metavar="NUM_GS MAX_JACOBI GUESS",
              help="The public GS-Jacobi code's three lists, e.g. '[8,1,1,1]' '[32,10,10,10]' '[0,0,0,0]'.")
@click.option("--guess", default=None, help="guess_list for --hand, e.g. '[0,1,0,0]' (0 = z, 1 = zeros).")
@click.option("--checkpoint", default=None, help="Model (default for --profile: the checkpoint it names).")
@click.option("--in-channels", default=3, show_default=True, help="Image channels (only read for raw .pth files).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write plan.json.")
def plan_command(profile_path, tol, guidance, hand, paper_lists, guess, checkpoint, in_channels, out):
    """Compute the fastest plan within --tol of sequential sampling, or write a paper-style hand plan."""
    from ..profile import Profile
    from ..schedule import hand_plan, schedule

    given = [name for name, v in (("--profile", profile_path), ("--hand", hand), ("--paper-lists", paper_lists)) if v]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --profile, --hand, --paper-lists")
    if profile_path:
        prof = Profile.load(profile_path)
        source = checkpoint or prof.checkpoint
        if not source:
            raise click.UsageError("the profile names no checkpoint: pass --checkpoint")
        model, _ = _load_model(source, in_channels)
        plan = schedule(prof, model, tol=tol, guidance=guidance)
        ev = plan.evidence
        click.echo(f"auto plan: predicted {ev['predicted_seconds']['speedup']:.2f}x over sequential, final error "
                   f"{max(ev['final_error'].values()):.2e} (tol {tol:g})"
                   + (f"; fell back to sequential: {ev['fallback']}" if ev["fallback"] else ""))
        for b in ev["blocks"]:
            c = b["chosen"]
            click.echo(f"  block {b['block']}: {c['solver']:<10} L={c['segment_len']} init={c['init']} "
                       f"tol={c['tol']:g} cap={c['cap']} CRM share {100 * b['crm_share']:.1f}%")
    else:
        if not checkpoint:
            raise click.UsageError("--hand and --paper-lists need --checkpoint (for the block and token counts)")
        model, _ = _load_model(checkpoint, in_channels)
        try:
            if hand:
                plan = hand_plan(hand, model, _int_list(guess, "--guess") if guess else None)
            else:
                lists = [_int_list(t, "--paper-lists") for t in paper_lists]
                plan = Plan.from_paper_lists(*lists, num_tokens=model.num_tokens, name="paper-lists")
                plan.model_hash = model_hash(model)
        except PlanError as e:
            raise click.UsageError(str(e)) from e
    plan.save(out)
    click.echo(f"plan written to {out}")


ALL = [profile_command, plan_command]
