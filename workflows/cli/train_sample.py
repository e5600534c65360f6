"""`tarflow-gs train` and `tarflow-gs sample`: argument parsing only."""
from __future__ import annotations

import click
from click.core import ParameterSource

from tarflow.train import TrainConfig

from .options import checkpoint_options, options_for, progress_option, spec_options

_POSITIVE = click.IntRange(min=1)
TRAIN_OPTIONS = [
    (("dataset",), "--dataset", "mnist5k, digits, or an ImageFolder directory (one sub-folder per class)."),
    (("out",), "--out", "Checkpoint path (safetensors); the resume state is written next to it as OUT.state.pt."),
    (("image_size",), "--image-size", "Resize images to this size (default: native)."),
    (("in_channels",), "--in-channels", "Channel count every image must have (default: native)."),
    (("patch_size",), "--patch-size", "Patch side: tokens are patch x patch x channels."),
    (("width",), "--width", "Transformer width."),
    (("num_blocks",), "--num-blocks", "Autoregressive flow blocks."),
    (("layers_per_block",), "--layers-per-block", "Transformer layers in each block."),
    (("head_dim",), "--head-dim", "Attention head width (width must be a multiple)."),
    (("conditional",), "--conditional/--unconditional", "Learn a class embedding from the dataset's labels."),
    (("noise_std",), "--noise-std", "Training noise; stored with the model, denoising undoes it."),
    (("drop_label",), "--drop-label", "Probability of training a sample with the mean class embedding (for "
                                      "guidance)."),
    (("epochs",), "--epochs", "Passes over the data."),
    (("batch_size",), "--batch-size", "Images per optimizer step."),
    (("lr",), "--lr", "Peak learning rate (AdamW)."),
    (("warmup_steps",), "--warmup-steps", "Linear warm-up steps before the cosine decay."),
    (("weight_decay",), "--weight-decay", "AdamW weight decay."),
    (("seed",), "--seed", "Seed of initialisation, batches, noise and label dropout."),
    (("device",), "--device", "cpu, cuda, cuda:N or mps."),
    (("precision",), "--precision", "The network's autocast dtype."),
]


@click.command("train")
@options_for(TrainConfig, TRAIN_OPTIONS, "cfg", {("out",): {"type": click.Path(dir_okay=False)}})
@click.option("--resume", "resume_from", type=click.Path(dir_okay=False), default=None,
              help="Continue the interrupted run that wrote this checkpoint, with its stored settings.")
@progress_option
@click.pass_context
def train_command(ctx, cfg, resume_from, progress):
    """Train a TarFlow; checkpoints after every epoch and reports held-out bits/dim."""
    from tarflow.train import resume_config, train

    if resume_from:
        given = [param.opts[0] for param in ctx.command.params if param.name.startswith("cfg__")
                 and ctx.get_parameter_source(param.name) is not ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"--resume continues with the stored settings; drop {', '.join(given)}")
        cfg = resume_config(resume_from)
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
