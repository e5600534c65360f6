"""Options shared by several commands: the sampling spec and a stage's Ray resources, built once."""
from __future__ import annotations

import functools

import click

from tarflow import Denoise, Guidance, SamplingSpec

from ..config import Resources


def parse_labels(ctx, param, value):
    """'uniform' | 'none' | comma-separated class ids (-1: unconditional) -> the spec's label policy."""
    if value is None:
        return None
    text = value.strip().lower()
    if text in ("uniform", "none"):
        return text
    try:
        ids = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        ids = ()
    if not ids or min(ids) < -1:
        raise click.BadParameter(f"{value!r}: give 'uniform', 'none', or class ids such as 3,5,7 (-1: unconditional)")
    return ids


def spec_options(batch_size: int | None = 16):
    """Add the sampling-spec options to a command; the command receives `spec` (a SamplingSpec)."""
    def decorate(command):
        options = [
            click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                         help="Run seed: sample i's noise comes from (seed, i)."),
            click.option("--labels", callback=parse_labels, default=None,
                         help="'uniform' (cycle all classes), 'none' (unconditional), or class ids '3,5,7' to cycle "
                              "(-1: unconditional). Default: uniform for a class-conditional model, else none."),
            click.option("--guidance", type=float, default=0.0, show_default=True,
                         help="Classifier-free guidance scale (0: off)."),
            click.option("--annealed/--constant", default=False, show_default=True,
                         help="Guidance weight grows linearly over tokens, as the reference samples."),
            click.option("--attn-temp", type=float, default=1.0, show_default=True,
                         help="Attention temperature of the unconditional guidance branch."),
            click.option("--guide-what", type=click.Choice(["a", "b", "ab"]), default="ab", show_default=True,
                         help="Guide the log-scale a, the shift b, or both."),
            click.option("--denoise", type=float, default=0.0, show_default=True,
                         help="Self-denoising step multiplier (1: Tweedie's step; 0: off)."),
            click.option("--noise-std", type=float, default=None,
                         help="The model's training noise, for --denoise (default: from the checkpoint)."),
            click.option("--batch-size", type=click.IntRange(min=1), default=batch_size,
                         required=batch_size is None, show_default=batch_size is not None,
                         help="Samples per batch: the batch a plan is profiled, certified and run at."),
            click.option("--autocast", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
                         show_default=True, help="The network's autocast dtype (iterates stay float32)."),
        ]

        @functools.wraps(command)
        def wrapper(*args, seed, labels, guidance, annealed, attn_temp, guide_what, denoise, noise_std, batch_size,
                    autocast, **kwargs):
            spec = SamplingSpec(seed, labels, Guidance(guidance, annealed, attn_temp, guide_what),
                                Denoise(denoise, noise_std), batch_size, autocast)
            return command(*args, spec=spec, **kwargs)

        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper
    return decorate


def resources_options(stage: str, actors: bool = True):
    """Add --actors / --num-cpus / --num-gpus for one stage; the command receives `resources`."""
    def decorate(command):
        options = [
            click.option("--num-cpus", type=click.FloatRange(min=0, min_open=True), default=None,
                         help=f"CPUs per {stage} worker, also its torch threads (default: a share that leaves the "
                              "cluster a CPU for other work)."),
            click.option("--num-gpus", type=click.FloatRange(min=0), default=0.0, show_default=True,
                         help=f"GPUs per {stage} worker (it samples on CUDA when given one)."),
        ]
        if actors:
            options.insert(0, click.option("--actors", type=click.IntRange(min=1), default=1, show_default=True,
                                           help=f"{stage} workers at once."))

        @functools.wraps(command)
        def wrapper(*args, num_cpus, num_gpus, actors=1, **kwargs):
            return command(*args, resources=Resources(actors=actors, num_cpus=num_cpus, num_gpus=num_gpus), **kwargs)

        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper
    return decorate


def checkpoint_options(command):
    """--checkpoint and --in-channels; the command receives `model_ref`."""
    from tarflow import ModelRef

    @click.option("--checkpoint", required=True,
                  help="The model: 'demo' (shipped), a tarflow-gs .safetensors or raw apple .pth path, or a URI.")
    @click.option("--in-channels", type=click.IntRange(min=1), default=3, show_default=True,
                  help="Image channels; only read for raw .pth checkpoints.")
    @functools.wraps(command)
    def wrapper(*args, checkpoint, in_channels, **kwargs):
        return command(*args, model_ref=ModelRef(checkpoint, in_channels), **kwargs)

    return wrapper


def progress_option(command):
    """--progress/--no-progress; unset (None): a bar only when stderr is a terminal (`workflows.progress`)."""
    return click.option(
        "--progress/--no-progress", default=None,
        help="--progress: progress bars; --no-progress: a plain line every 30 s instead. Default: bars only on a "
             "terminal, so `ray job logs` and CI logs get lines, not carriage returns.")(command)
