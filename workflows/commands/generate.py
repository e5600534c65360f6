"""`tarflow-gs generate`: sample a large image set with a Ray actor pool into Parquet shards."""
from __future__ import annotations

import click


@click.command("generate")
@click.option("--checkpoint", required=True, help="Model: tarflow-gs safetensors or a raw apple/ml-tarflow .pth.")
@click.option("--in-channels", type=int, default=3, show_default=True,
              help="Image channels; only read for raw .pth checkpoints.")
@click.option("--plan", "plan", default=None, help="Plan JSON (from `tarflow-gs schedule`); default sequential.")
@click.option("--num-samples", type=int, required=True)
@click.option("--seed", type=int, required=True, help="Global seed: sample i's noise comes from (seed, i).")
@click.option("--labels", default=None,
              help="'uniform' (cycle all classes; default for conditional models), 'none', or class ids '3,5,7'.")
@click.option("--guidance", type=float, default=0.0, show_default=True, help="Classifier-free guidance scale.")
@click.option("--attn-temp", type=float, default=1.0, show_default=True, help="Guidance attention temperature.")
@click.option("--annealed-guidance/--constant-guidance", default=False, show_default=True)
@click.option("--guide-what", type=click.Choice(["a", "b", "ab"]), default="ab", show_default=True)
@click.option("--denoise", type=float, default=0.0, show_default=True,
              help="Self-denoising step multiplier (1 = Tweedie's step); 0 turns it off.")
@click.option("--noise-std", type=float, default=None,
              help="Training noise of the model, for --denoise (default: from the checkpoint).")
@click.option("--actors", type=int, default=1, show_default=True)
@click.option("--gpus-per-actor", type=float, default=0.0, show_default=True)
@click.option("--cpus-per-actor", type=float, default=None,
              help="Default: a share of the cluster's CPUs that leaves room for other work.")
@click.option("--batch-size", type=int, required=True)
@click.option("--shard-size", type=int, default=1024, show_default=True, help="Samples per Parquet shard.")
@click.option("--out", required=True, help="Output directory or URI (file://, s3://, gs://).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def generate_command(checkpoint, in_channels, plan, num_samples, seed, labels, guidance, attn_temp,
                     annealed_guidance, guide_what, denoise, noise_std, actors, gpus_per_actor, cpus_per_actor, batch_size,
                     shard_size, out, progress):
    """Generate NUM_SAMPLES images into Parquet shards; re-running resumes."""
    from tarflow import CheckpointError, PlanError
    from workflows.generate import GenerateConfig, GenerateError, generate
    from workflows.shards import ShardError

    cfg = GenerateConfig(checkpoint=checkpoint, out=out, num_samples=num_samples, seed=seed, plan=plan,
                         in_channels=in_channels, labels=labels, guidance=guidance, attn_temp=attn_temp,
                         annealed_guidance=annealed_guidance, guide_what=guide_what, denoise=denoise, noise_std=noise_std,
                         batch_size=batch_size, shard_size=shard_size, actors=actors,
                         gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor)
    try:
        summary = generate(cfg, progress=progress)
    except (FileNotFoundError, CheckpointError, PlanError, GenerateError, ShardError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(summary.text())


ALL = [generate_command]
