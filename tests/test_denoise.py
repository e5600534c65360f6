"""Denoising against a TarFlow whose density is known in closed form (a diagonal affine map)."""
import pytest
import torch

from conftest import make_tiny_model
from tarflow.denoise import denoise, log_prob, score_step


def affine_model(seed=0):
    """Zero proj_out weights, random biases: every block is z = (x - b) * exp(-a) with constant a, b."""
    model = make_tiny_model(seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for block in model.blocks:
        block.proj_out.weight.data.zero_()
        block.proj_out.bias.data = 0.3 * torch.randn(block.proj_out.bias.shape, generator=gen)
    return model


def closed_form_scale(model):
    """dz/dx per token element (T, D): product over blocks of exp(-a), except each block's first token."""
    T, D = model.num_tokens, model.token_dim
    scale = torch.ones(T, D)
    for block in model.blocks:
        a = block.proj_out.bias.data[:D]
        s = torch.exp(-a).expand(T, D).clone()
        s[T - 1 if block.flip else 0] = 1.0  # the block's first token (in its own order) passes through
        scale *= s
    return scale


@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_score_step_moves_by_tweedie_amount(multiplier):
    model = affine_model()
    sigma = 0.2
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 1.6 - 0.8
    y = torch.arange(6) % 10
    with torch.no_grad():
        z, _ = model.encode(x, y)
    # log p = -0.5 |z|^2 + const with z = s * x + c  =>  grad_x log p = -s * z (token space)
    expected = x + multiplier * sigma**2 * model.unpatchify(-closed_form_scale(model) * z)
    out = score_step(model, x, y, noise_std=sigma, lr_multiplier=multiplier, chunk_size=4)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - x).abs().max() > 1e-3  # the step is not trivially zero


def test_log_prob_of_affine_flow_matches_closed_form():
    model = affine_model(seed=2)
    x = torch.randn(3, 1, 8, 8) * 0.5
    with torch.no_grad():
        z, _ = model.encode(x)
        expected = -0.5 * z.pow(2).flatten(1).sum(1) + closed_form_scale(model).log().sum()
        torch.testing.assert_close(log_prob(model, x), expected, atol=1e-4, rtol=1e-5)


def test_denoise_clips_and_is_independent_of_chunking():
    model = make_tiny_model(seed=1)
    x = torch.randn(5, 1, 8, 8) * 1.5
    y = torch.tensor([0, 1, 2, 3, -1])
    a = denoise(model, x, y, noise_std=0.3, chunk_size=2)
    b = denoise(model, x, y, noise_std=0.3, chunk_size=5)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert a.min() >= -1 and a.max() <= 1
    unclipped = score_step(model, x, y, noise_std=0.3)
    assert (unclipped.abs() > 1).any()  # clipping did something


def test_denoise_accepts_inference_tensors_and_autocast():
    """Samples come out of inference mode; denoising them takes the same step as on ordinary tensors,
    and under bf16 autocast a step that differs from the fp32 one by bf16 rounding only."""
    model = make_tiny_model()
    gen = torch.Generator().manual_seed(5)
    plain = (torch.randn(4, 1, 8, 8, generator=gen) * 0.5).clamp(-0.9, 0.9)  # in range: no clipping
    with torch.inference_mode():
        x = plain.clone()
    assert x.is_inference()
    ref = denoise(model, plain, torch.arange(4), noise_std=0.3)
    step = (ref - plain).abs().max().item()
    assert step > 0.05  # a real step to compare against
    assert torch.equal(denoise(model, x, torch.arange(4), noise_std=0.3), ref)
    out = denoise(model, x, torch.arange(4), noise_std=0.3, autocast_dtype=torch.bfloat16)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # bf16 rounding of the step, not another step and not no step: within 10% of it
    assert (out - ref).abs().max().item() < 0.1 * step
    assert torch.equal(denoise(model, x, torch.arange(4), noise_std=0.0), x)  # sigma 0: identity (x in range)


def test_denoise_rejects_bad_arguments():
    model = make_tiny_model()
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match="labels"):
        denoise(model, x, torch.arange(3))
    with pytest.raises(ValueError, match="chunk_size"):
        denoise(model, x, chunk_size=0)
