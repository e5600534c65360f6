"""Calibration: a batch of noise whose true solution is known for every block.

Training images pushed through `encode` give every block's true input and output (the paper's
recipe); without data, the model's own sequential samples from seeded noise do. Under guidance
the sampling map differs from the encoder, so the true pairs then come from sequential sampling
of the same noise under the spec's guidance (all of it: annealing, attention temperature, what
is guided). The profile measures solvers against these pairs; the scheduler verifies plans on
the same noise.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import load_dataset
from .model import Model
from .noise import sample_noise
from .schema import STRICT_FIELDS, SchemaError, check_int
from .solvers import solve_block
from .spec import SamplingSpec

NO_DATA = "samples"  # calibration source when no data is given: the model's own sequential samples


class CalibrationError(SchemaError):
    """Calibration that cannot run as asked (too few images, a model that overflows)."""


@dataclass
class CalibrationSource:
    source: str  # a dataset name or folder, or "samples" (the model's own sequential samples)
    num_images: int
    seed: int

    __pydantic_config__ = STRICT_FIELDS


@dataclass
class Calibration:
    """Noise (B, T, D) in the sampler's input convention (unit Gaussian scale), labels or None,
    and, for data, the images it encodes."""

    noise: torch.Tensor
    labels: torch.Tensor | None
    images: torch.Tensor | None
    source: CalibrationSource


@torch.inference_mode()
def calibration_batch(model: Model, data: str | None, num_images: int, seed: int = 0,
                      conditional: bool = True) -> Calibration:
    """The calibration noise (on the CPU): encoded training images, or seeded Gaussian noise (no
    data). `conditional=False` (a spec that samples unconditionally) gives no labels."""
    T, D = model.num_tokens, model.token_dim
    g = torch.Generator().manual_seed(seed)
    num_classes = model.config.num_classes if conditional else 0
    if data in (None, NO_DATA):
        labels = torch.randint(num_classes, (num_images,), generator=g) if num_classes else None
        return Calibration(sample_noise(seed, range(num_images), T, D), labels, None,
                           CalibrationSource(NO_DATA, num_images, seed))
    ds = load_dataset(data, image_size=model.config.img_size, channels=model.config.in_channels, split="train")
    if len(ds.images) < num_images:
        raise CalibrationError(f"calibration wants {num_images} images but {data!r} has {len(ds.images)} (train split)")
    rows = torch.randperm(len(ds.images), generator=g)[:num_images]
    images = ds.images[rows]
    labels = ds.labels[rows] if num_classes else None
    device = model.var.device
    z, _ = model.encode(images.to(device), None if labels is None else labels.to(device))
    return Calibration((z / model.var.sqrt()).cpu(), labels, images, CalibrationSource(str(data), num_images, seed))


@torch.inference_mode()
def block_pairs(model: Model, calib: Calibration, spec: SamplingSpec) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per forward block i, its true (z_i, x_i) under the spec: the block maps x_i to z_i."""
    pairs: list = [None] * len(model.blocks)
    if calib.images is not None and not spec.guidance.active:
        x = model.patchify(calib.images)
        for i, block in enumerate(model.blocks):
            z, _ = block(x, calib.labels)
            pairs[i] = (z, x)
            x = z
        return pairs
    z = calib.noise * model.var.sqrt()
    with spec.autocast_context(z.device.type):
        for i in reversed(range(len(model.blocks))):
            x = solve_block(model.blocks[i], z, calib.labels, guidance=spec.guidance).x
            if not bool(torch.isfinite(x).all()):
                raise CalibrationError(f"sequential sampling overflows in block {i} on the calibration noise "
                                   f"({spec.summary()}): the model cannot be profiled with these settings")
            pairs[i] = (z, x)
            z = x
    return pairs


@torch.inference_mode()
def calibrate(model: Model, spec: SamplingSpec, data: str | None, num_images: int, device="cpu"):
    """(calibration source, labels, [(z_i, x_i) per forward block]) on the CPU: the calibration rows
    (rounded up to whole batches of the spec's batch size) and every block's true pairs under the
    spec, computed on `device`."""
    B = spec.batch_size
    check_int(num_images, "num_images", error=CalibrationError)
    num_images = -(-num_images // B) * B
    model = model.eval().to(device)
    calib = calibration_batch(model, data, num_images, spec.seed, conditional=spec.labels != "none")
    on_device = Calibration(calib.noise.to(device), None if calib.labels is None else calib.labels.to(device),
                            None if calib.images is None else calib.images.to(device), calib.source)
    pairs = [(z.cpu(), x.cpu()) for z, x in block_pairs(model, on_device, spec)]
    return calib.source, calib.labels, pairs
