"""`tarflow-gs generate`: sample a large image set with a Ray actor pool into Parquet shards."""
from __future__ import annotations

import click

from ..config import GenerateConfig
from .options import build, checkpoint_options, field_option, progress_option, resources_options, spec_options

OPTIONS = {("out",): "--out", ("samples", "num_samples"): "--num-samples", ("samples", "shard_size"): "--shard-size"}


@click.command("generate")
@checkpoint_options
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), default=None,
              help="Plan JSON (from `tarflow-gs plan`); default sequential.")
@field_option(GenerateConfig, ("samples", "num_samples"), "--num-samples", "Sample ids 0..N-1.", required=True,
              default=None, show_default=False)
@spec_options(batch_size=None)
@field_option(GenerateConfig, ("samples", "shard_size"), "--shard-size", "Samples per Parquet shard.")
@resources_options("generate")
@field_option(GenerateConfig, ("out",), "--out", "Output directory or URI (file://, s3://, gs://).")
@progress_option
def generate_command(model_ref, plan_path, num_samples, spec, shard_size, resources, out, progress):
    """Generate NUM_SAMPLES images into Parquet shards; re-running the same command resumes."""
    from tarflow import Plan

    from ..stages.generate import generate

    cfg = build(GenerateConfig, {("model",): model_ref, ("out",): out, ("samples", "num_samples"): num_samples,
                                 ("samples", "shard_size"): shard_size, ("spec",): spec, ("resources",): resources,
                                 ("plan",): Plan.load(plan_path) if plan_path else None}, OPTIONS)
    click.echo(generate(cfg, progress=progress).text())


COMMANDS = [generate_command]
