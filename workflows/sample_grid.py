"""Sample a small set of images from a checkpoint on this machine and save them as a PNG grid.

Sample i uses noise drawn from (seed, i) and label labels[i % len(labels)], so the
images do not depend on the batch size."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tarflow import Plan, SampleStats, load_checkpoint, model_hash, sample, sample_noise
from tarflow.denoise import denoise


@dataclass
class GridResult:
    images: torch.Tensor  # (N, C, H, W) in [-1, 1]
    labels: list[int] | None
    stats: list[SampleStats]  # one per batch
    noise_std: float | None


def resolve_labels(labels: list[int] | None, num_samples: int, num_classes: int) -> list[int] | None:
    """Labels per sample: the given list cycled; default 0..K-1 cycled for a conditional model."""
    if not num_classes:
        if labels and any(y >= 0 for y in labels):
            raise ValueError("labels were given but the model is unconditional (num_classes=0)")
        return None
    labels = labels or list(range(num_classes))
    bad = [y for y in labels if not -1 <= y < num_classes]
    if bad:
        raise ValueError(f"label {bad[0]} out of range: the model has {num_classes} classes (use -1 for none)")
    return [labels[i % len(labels)] for i in range(num_samples)]


def sample_images(checkpoint, num_samples: int, seed: int, labels: list[int] | None = None, plan_path=None,
                  guidance: float = 0.0, attn_temp: float = 1.0, annealed: bool = False, denoise_lr: float = 0.0,
                  noise_std: float | None = None, in_channels: int = 3, batch_size: int = 64) -> GridResult:
    """Sample `num_samples` images; with `denoise_lr` > 0 apply the Tweedie step scaled by it.

    `noise_std` defaults to the one stored with a tarflow-gs checkpoint (raw apple
    checkpoints do not record it, so denoising them needs it given)."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples={num_samples} and batch_size={batch_size} must be positive")
    model, meta = load_checkpoint(checkpoint, in_channels=in_channels, with_metadata=True)
    noise_std = meta.get("noise_std") if noise_std is None else noise_std
    if denoise_lr > 0 and noise_std is None:
        raise ValueError(f"{checkpoint} does not record its training noise_std: pass it to denoise")
    plan = Plan.load(plan_path) if plan_path else None
    if plan is not None:
        plan.check_model(len(model.blocks), model.num_tokens, model_hash(model))
    ys = resolve_labels(labels, num_samples, model.config.num_classes)
    images, stats = [], []
    for start in range(0, num_samples, batch_size):
        ids = range(start, min(start + batch_size, num_samples))
        noise = sample_noise(seed, ids, model.num_tokens, model.token_dim)
        y = None if ys is None else torch.tensor(ys[ids.start:ids.stop])
        out = sample(model, noise, y, plan=plan, guidance=guidance, attn_temp=attn_temp, annealed_guidance=annealed)
        x = out.images
        if denoise_lr > 0:
            x = denoise(model, x, y, noise_std=noise_std, lr_multiplier=denoise_lr)
        images.append(x.clamp(-1, 1))
        stats.append(out.stats)
    return GridResult(torch.cat(images), ys, stats, noise_std)


def save_grid(images: torch.Tensor, path, nrow: int = 10) -> Path:
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((images + 1) / 2, path, nrow=nrow, padding=2, pad_value=1.0)
    return path
