"""`tarflow-gs train` and `tarflow-gs sample`: argument parsing only."""
from __future__ import annotations

import click
from click.core import ParameterSource

from tarflow.train import PRECISIONS, TrainConfig

_DEFAULTS = TrainConfig()


@click.command("train")
@click.option("--dataset", default=_DEFAULTS.dataset, show_default=True,
              help="mnist5k, digits, or an ImageFolder directory (one sub-folder per class).")
@click.option("--out", default=_DEFAULTS.out, show_default=True,
              help="Checkpoint path (safetensors); the resume state is written next to it as OUT.state.pt.")
@click.option("--image-size", type=int, default=None, help="Resize images to this size (default: native).")
@click.option("--in-channels", type=int, default=None, help="Channel count every image must have (default: native).")
@click.option("--patch-size", type=int, default=_DEFAULTS.patch_size, show_default=True)
@click.option("--width", type=int, default=_DEFAULTS.width, show_default=True, help="Transformer width.")
@click.option("--num-blocks", type=int, default=_DEFAULTS.num_blocks, show_default=True)
@click.option("--layers-per-block", type=int, default=_DEFAULTS.layers_per_block, show_default=True)
@click.option("--head-dim", type=int, default=_DEFAULTS.head_dim, show_default=True)
@click.option("--conditional/--unconditional", default=_DEFAULTS.conditional, show_default=True)
@click.option("--noise-std", type=float, default=_DEFAULTS.noise_std, show_default=True,
              help="Training noise; stored with the model, denoising undoes it.")
@click.option("--drop-label", type=float, default=_DEFAULTS.drop_label, show_default=True,
              help="Probability of training a sample with the mean class embedding (for guidance).")
@click.option("--epochs", type=int, default=_DEFAULTS.epochs, show_default=True)
@click.option("--batch-size", type=int, default=_DEFAULTS.batch_size, show_default=True)
@click.option("--lr", type=float, default=_DEFAULTS.lr, show_default=True)
@click.option("--warmup-steps", type=int, default=_DEFAULTS.warmup_steps, show_default=True)
@click.option("--weight-decay", type=float, default=_DEFAULTS.weight_decay, show_default=True)
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True)
@click.option("--device", default=_DEFAULTS.device, show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default=_DEFAULTS.precision, show_default=True)
@click.option("--resume", "resume_from", type=click.Path(dir_okay=False), default=None,
              help="Continue the interrupted run that wrote this checkpoint, with its stored settings.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar with loss and bits/dim.")
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
        try:
            cfg = TrainConfig(**options).validate()
        except ValueError as e:
            raise click.BadParameter(str(e)) from e
    path = train(cfg, resume=bool(resume_from), progress=progress, log=click.echo)
    click.echo(f"checkpoint: {path}")


def _parse_labels(ctx, param, value):
    if not value:
        return None
    try:
        return [int(v) for part in value for v in part.split(",") if v.strip()]
    except ValueError as e:
        raise click.BadParameter(f"labels must be integers (comma-separated or repeated), got {value}") from e


@click.command("sample")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False),
              help="tarflow-gs safetensors checkpoint or raw apple .pth state dict.")
@click.option("--in-channels", type=int, default=3, show_default=True,
              help="Image channels of a raw apple checkpoint (ignored for tarflow-gs files).")
@click.option("--num-samples", type=int, default=100, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Sample i uses noise from (seed, i).")
@click.option("--labels", multiple=True, callback=_parse_labels,
              help="Class labels, cycled over samples (e.g. 0,1,2 or repeated); -1 = unconditional. "
                   "Default: 0..K-1 cycled for a conditional model.")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), default=None,
              help="Plan JSON choosing a solver per block (default: sequential).")
@click.option("--guidance", type=float, default=0.0, show_default=True, help="Classifier-free guidance scale.")
@click.option("--attn-temp", type=float, default=1.0, show_default=True,
              help="Attention temperature of the unconditional guidance branch.")
@click.option("--annealed", is_flag=True, help="Anneal guidance linearly over tokens, as the reference.")
@click.option("--denoise", "denoise_lr", type=float, default=0.0, show_default=True,
              help="Self-denoising step multiplier (1 = Tweedie's step); 0 turns it off.")
@click.option("--noise-std", type=float, default=None,
              help="Training noise of the model (default: from the checkpoint).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--nrow", type=int, default=10, show_default=True, help="Images per grid row.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG grid to write.")
def sample_command(checkpoint, in_channels, num_samples, seed, labels, plan_path, guidance, attn_temp, annealed,
                   denoise_lr, noise_std, batch_size, nrow, out):
    """Sample images from a checkpoint into a PNG grid and print the solver statistics."""
    from workflows.sample_grid import sample_images, save_grid

    try:
        result = sample_images(checkpoint, num_samples, seed, labels, plan_path, guidance, attn_temp, annealed,
                               denoise_lr, noise_std, in_channels, batch_size)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    for i, stats in enumerate(result.stats):
        click.echo(f"batch {i}: {stats.summary()}")
    if result.labels is not None:
        click.echo(f"labels: {','.join(map(str, result.labels))}")
    click.echo(f"wrote {save_grid(result.images, out, nrow)}")


ALL = [train_command, sample_command]
