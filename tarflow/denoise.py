"""Score-based self-denoising of samples, as the reference sampler (apple/ml-tarflow) applies it.

A TarFlow trained on data plus Gaussian noise of std sigma models the noisy density
p_sigma. Tweedie's formula gives the posterior mean of the clean image:
    E[x_clean | x] = x + sigma^2 * grad_x log p_sigma(x | y),
and the model's exact log-likelihood supplies the score. `lr_multiplier` scales the
step (the reference's `self_denoising_lr`; 1 is Tweedie's step).

The log-density is the one the model was trained on: a standard normal prior on z
(the training loss 0.5*mean(z^2) - mean(logdet)), not the EMA variance that sampling
scales noise by.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from .model import Model
from .schema import check_finite, check_int


def log_prob(model: Model, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample log p(x | y) up to a constant: -0.5*||z||^2 + log|det dz/dx|."""
    z, logdet = model(x, labels)
    num_dims = z[0].numel()
    # the model's logdet is a per-dimension mean; the density needs the sum over dimensions
    return -0.5 * z.float().pow(2).flatten(1).sum(1) + num_dims * logdet.float()


def score_step(model: Model, x: torch.Tensor, labels=None, noise_std: float = 0.05, lr_multiplier: float = 1.0,
               chunk_size: int = 64, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x + lr_multiplier * noise_std^2 * grad_x log p(x | y), in chunks of `chunk_size` images; not clipped."""
    check_int(chunk_size, "chunk_size")
    check_finite(noise_std, "noise_std")
    step = lr_multiplier * noise_std**2
    y = None if labels is None else torch.as_tensor(labels, dtype=torch.long, device=x.device).reshape(-1)
    if y is not None and y.numel() != x.shape[0]:
        raise ValueError(f"got {y.numel()} labels for {x.shape[0]} images")
    if y is not None and not model.config.num_classes:
        y = None  # an unconditional model ignores labels, as sampling does
    autocast = torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    out = []
    # samples usually come out of inference mode; gradients need ordinary tensors
    with torch.inference_mode(False), torch.enable_grad():
        for start in range(0, x.shape[0], chunk_size):
            xc = x[start:start + chunk_size].detach().clone().float().requires_grad_(True)
            yc = None if y is None else y[start:start + chunk_size].clone()
            with autocast:
                logp = log_prob(model, xc, yc)
            (grad,) = torch.autograd.grad(logp.sum(), xc)
            out.append((xc + step * grad).detach())
    return torch.cat(out) if out else x.clone()


def denoise(model: Model, x: torch.Tensor, labels=None, noise_std: float = 0.05, lr_multiplier: float = 1.0,
            chunk_size: int = 64, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One Tweedie denoising step (see `score_step`), then clip to the data range [-1, 1]."""
    return score_step(model, x, labels, noise_std, lr_multiplier, chunk_size, autocast_dtype).clamp_(-1.0, 1.0)
