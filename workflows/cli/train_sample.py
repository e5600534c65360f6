"""`tarflow-gs train` and `tarflow-gs sample`: argument parsing only."""
from __future__ import annotations

import click
from click.core import ParameterSource

from tarflow.train import PRECISIONS, TrainConfig

from .options import checkpoint_options, progress_option, spec_options

_DEFAULTS = TrainConfig()


def _device(value: str) -> str:
    """cpu, mps, cuda or cuda:N, else a usage error naming --device (exit 2)."""
    kind, _, index = value.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise click.BadParameter(f"{value!r}: give cpu, cuda, cuda:N or mps")
    return value
_POSITIVE = click.IntRange(min=1)


@click.command("train")
@click.option("--dataset", default=_DEFAULTS.dataset, show_default=True,
              help="mnist5k, digits, or an ImageFolder directory (one sub-folder per class).")
@click.option("--out", default=_DEFAULTS.out, show_default=True, type=click.Path(dir_okay=False),
              help="Checkpoint path (safetensors); the resume state is written next to it as OUT.state.pt.")
@click.option("--image-size", type=_POSITIVE, default=None, help="Resize images to this size (default: native).")
@click.option("--in-channels", type=_POSITIVE, default=None,
              help="Channel count every image must have (default: native).")
@click.option("--patch-size", type=_POSITIVE, default=_DEFAULTS.patch_size, show_default=True,
              help="Patch side: tokens are patch x patch x channels.")
@click.option("--width", type=_POSITIVE, default=_DEFAULTS.width, show_default=True, help="Transformer width.")
@click.option("--num-blocks", type=_POSITIVE, default=_DEFAULTS.num_blocks, show_default=True,
              help="Autoregressive flow blocks.")
@click.option("--layers-per-block", type=_POSITIVE, default=_DEFAULTS.layers_per_block, show_default=True,
              help="Transformer layers in each block.")
@click.option("--head-dim", type=_POSITIVE, default=_DEFAULTS.head_dim, show_default=True,
              help="Attention head width (width must be a multiple).")
@click.option("--conditional/--unconditional", default=_DEFAULTS.conditional, show_default=True,
              help="Learn a class embedding from the dataset's labels.")
@click.option("--noise-std", type=click.FloatRange(min=0), default=_DEFAULTS.noise_std, show_default=True,
              help="Training noise; stored with the model, denoising undoes it.")
@click.option("--drop-label", type=click.FloatRange(0, 1, max_open=True), default=_DEFAULTS.drop_label,
              show_default=True, help="Probability of training a sample with the mean class embedding (for guidance).")
@click.option("--epochs", type=_POSITIVE, default=_DEFAULTS.epochs, show_default=True, help="Passes over the data.")
@click.option("--batch-size", type=_POSITIVE, default=_DEFAULTS.batch_size, show_default=True,
              help="Images per optimizer step.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=_DEFAULTS.lr, show_default=True,
              help="Peak learning rate (AdamW).")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=_DEFAULTS.warmup_steps, show_default=True,
              help="Linear warm-up steps before the cosine decay.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=_DEFAULTS.weight_decay, show_default=True,
              help="AdamW weight decay.")
@click.option("--seed", type=click.IntRange(min=0), default=_DEFAULTS.seed, show_default=True,
              help="Seed of initialisation, batches, noise and label dropout.")
@click.option("--device", default=_DEFAULTS.device, show_default=True, callback=lambda ctx, param, v: _device(v),
              help="cpu, cuda[:N] or mps.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=_DEFAULTS.precision, show_default=True,
              help="The network's autocast dtype.")
@click.option("--resume", "resume_from", type=click.Path(dir_okay=False), default=None,
              help="Continue the interrupted run that wrote this checkpoint, with its stored settings.")
@progress_option
@click.pass_context
def train_command(ctx, resume_from, progress, **options):
    """Train a TarFlow; checkpoints after every epoch and reports held-out bits/dim."""
    from tarflow.train import resume_config, train

    if resume_from:
        given = [f"--{k.replace('_', '-')}" for k in options
                 if ctx.get_parameter_source(k) is not ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"--resume continues with the stored settings; drop {', '.join(given)}")
        cfg = resume_config(resume_from)
    else:
        cfg = TrainConfig(**options)
    from ..progress import wants_bar

    path = train(cfg, resume=bool(resume_from), progress=wants_bar(progress), log=click.echo)
    click.echo(f"checkpoint: {path}")


@click.command("sample")
@checkpoint_options
@click.option("--num-samples", type=_POSITIVE, default=100, show_default=True, help="Sample ids 0..N-1.")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), default=None,
              help="Plan JSON choosing a solver per block (default: sequential).")
@spec_options(batch_size=64)
@click.option("--nrow", type=_POSITIVE, default=10, show_default=True, help="Images per grid row.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG grid to write.")
def sample_command(model_ref, num_samples, plan_path, spec, nrow, out):
    """Sample images in this process into a PNG grid and print the solver statistics.

    Sample i is the same image `generate` writes for id i under the same options."""
    import torch

    from tarflow import Plan, model_hash, sample_ids

    from ..report.grid import save_grid

    model, provenance = model_ref.load(with_metadata=True)
    spec = spec.for_model(model.config.num_classes, provenance)
    plan = Plan.load(plan_path) if plan_path else None
    if plan is not None:
        plan.check_model(len(model.blocks), model.num_tokens, model_hash(model))
        plan.check_spec(spec)
    images = []
    for i, start in enumerate(range(0, num_samples, spec.batch_size)):
        out_batch = sample_ids(model, spec, range(start, min(start + spec.batch_size, num_samples)), plan)
        images.append(out_batch.images)
        click.echo(f"batch {i}: {out_batch.stats.summary()}")
    labels = spec.labels_for(range(num_samples), model.config.num_classes)
    if labels is not None:
        click.echo(f"labels: {','.join(map(str, labels.tolist()))}")
    click.echo(f"wrote {save_grid(torch.cat(images), out, nrow)}")


COMMANDS = [train_command, sample_command]
