"""`tarflow-gs profile` and `tarflow-gs plan`: measure a model's blocks, then compute (or write) a plan."""
from __future__ import annotations

import click

from tarflow import ModelRef
from tarflow.schema import SchemaError, parse_json

from ..config import CalibrationSection, PlanSection
from .options import build, checkpoint_options, field_option, resources_options, spec_options


def _int_list(text: str, name: str) -> list[int]:
    try:
        values = parse_json(text, name)
    except SchemaError:
        values = None
    if not isinstance(values, list) or not all(isinstance(v, int) for v in values):
        raise click.BadParameter(f"{text!r}: expected a list of integers such as [8,1,1,1]", param_hint=name)
    return values


@click.command("profile")
@checkpoint_options
@click.option("--data", default=None, help="Calibration images: dataset name (mnist5k, digits) or image folder. "
                                         "Default: the model's own sequential samples.")
@field_option(CalibrationSection, ("num_images",), "--num-images", "Calibration images (rounded up to whole "
              "batches).", default=8)
@spec_options(batch_size=1)
@resources_options("profile", actors=False)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write profile.json.")
def profile_command(model_ref, data, num_images, spec, resources, out):
    """Profile each block in a Ray task: CRM/IGM, convergence and cost on the resources given."""
    from ..stages.profile import profile

    num_images = build(CalibrationSection, {("data",): data, ("num_images",): num_images},
                       {("num_images",): "--num-images"}).num_images
    model, provenance = model_ref.load(with_metadata=True)
    prof, _ = profile(model, model_ref, spec.for_model(model.config.num_classes, provenance), data, num_images,
                      resources)
    prof.save(out)
    click.echo("CRM share per block: " + ", ".join(f"{b.block}: {100 * b.crm_share:.1f}%" for b in prof.blocks))
    click.echo(f"profile written to {out} ({prof.seconds:.1f}s, {prof.device})")


@click.command("plan")
@click.option("--profile", "profile_path", type=click.Path(dir_okay=False),
              help="profile.json from `tarflow-gs profile` (it names its model and sampling spec).")
@field_option(PlanSection, ("tol",), "--tol", "Max abs error of final images vs sequential sampling (model space).")
@click.option("--hand", default=None, help="A paper-style plan in [Stack-GS-J-Else] notation, e.g. 7-8-32-10.")
@click.option("--paper-lists", nargs=3, default=None, metavar="NUM_GS MAX_JACOBI GUESS",
              help="The public GS-Jacobi code's three lists, e.g. '[8,1,1,1]' '[32,10,10,10]' '[0,0,0,0]'.")
@click.option("--guess", default=None, help="guess_list for --hand, e.g. '[0,1,0,0]' (0 = z, 1 = zeros).")
@click.option("--checkpoint", default=None,
              help="The model for --hand / --paper-lists: 'demo', a path or a URI (for --profile: the one it names).")
@field_option(ModelRef, ("in_channels",), "--in-channels", "Image channels of a raw .pth --checkpoint.")
@resources_options("plan verification")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write plan.json.")
def plan_command(profile_path, tol, hand, paper_lists, guess, checkpoint, in_channels, resources, out):
    """Compute the fastest plan within --tol of sequential sampling, or write a paper-style hand plan.

    The auto plan is verified and raced in a Ray task with the resources given: give those of the
    generate workers that will use it."""
    from tarflow import Plan, PlanError, model_hash
    from tarflow.profile import Profile
    from tarflow.schedule import hand_plan

    given = [name for name, v in (("--profile", profile_path), ("--hand", hand), ("--paper-lists", paper_lists)) if v]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --profile, --hand, --paper-lists")
    tol = build(PlanSection, {("tol",): tol}, {("tol",): "--tol"}).tol
    model_ref = build(ModelRef, {("checkpoint",): checkpoint, ("in_channels",): in_channels},
                      {("checkpoint",): "--checkpoint", ("in_channels",): "--in-channels"}) if checkpoint else None
    if not profile_path and click.get_current_context().get_parameter_source("tol").name != "DEFAULT":
        raise click.UsageError(f"--tol bounds the auto plan computed from --profile; {given[0]} writes the plan "
                               "as given, with no tolerance: drop --tol")
    if profile_path:
        from ..stages.plan import auto_plan

        prof = Profile.load(profile_path)
        model_ref = model_ref or prof.model
        if model_ref is None:
            raise click.UsageError("the profile names no checkpoint (it was made from a model built in code): "
                                   "pass --checkpoint")
        plan, placement = auto_plan(prof, model_ref, tol, resources)
        ev = plan.evidence
        click.echo(f"auto plan: predicted {ev['predicted_seconds']['speedup']:.2f}x over sequential, final error "
                   f"{max(ev['final_error'].values()):.2e} (tol {tol:g}), verified on {placement['device']}"
                   + (f"; fell back to sequential: {ev['fallback']}" if ev["fallback"] else ""))
        for b in ev["blocks"]:
            click.echo(f"  block {b['block']}: {b['chosen']['plan']:<36} CRM share {100 * b['crm_share']:.1f}%")
    else:
        if model_ref is None:
            raise click.UsageError("--hand and --paper-lists need --checkpoint (for the block and token counts)")
        model = model_ref.load()
        try:
            if hand:
                plan = hand_plan(hand, model, _int_list(guess, "--guess") if guess else None)
            else:
                lists = [_int_list(t, "--paper-lists") for t in paper_lists]
                plan = Plan.from_paper_lists(*lists, num_tokens=model.num_tokens, name="paper-lists")
                plan = plan.bound_to(model_hash(model))
        except PlanError as e:
            raise click.UsageError(str(e)) from e
    plan.save(out)
    click.echo(f"plan written to {out}")


COMMANDS = [profile_command, plan_command]
