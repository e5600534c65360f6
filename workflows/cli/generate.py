"""`tarflow-gs generate`: sample a large image set with a Ray actor pool into Parquet shards."""
from __future__ import annotations

import click

from .options import checkpoint_options, progress_option, resources_options, spec_options


@click.command("generate")
@checkpoint_options
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), default=None,
              help="Plan JSON (from `tarflow-gs plan`); default sequential.")
@click.option("--num-samples", type=click.IntRange(min=1), required=True, help="Sample ids 0..N-1.")
@spec_options(batch_size=None)
@click.option("--shard-size", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Samples per Parquet shard.")
@resources_options("generate")
@click.option("--out", required=True, help="Output directory or URI (file://, s3://, gs://).")
@progress_option
def generate_command(model_ref, plan_path, num_samples, spec, shard_size, resources, out, progress):
    """Generate NUM_SAMPLES images into Parquet shards; re-running the same command resumes."""
    from tarflow import Plan

    from ..config import GenerateConfig, SampleSet
    from ..stages.generate import generate

    cfg = GenerateConfig(model=model_ref, out=out, samples=SampleSet(num_samples=num_samples, shard_size=shard_size),
                         spec=spec, plan=Plan.load(plan_path) if plan_path else None, resources=resources)
    click.echo(generate(cfg, progress=progress).text())


COMMANDS = [generate_command]
