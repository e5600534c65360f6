"""CRM and IGM on a block small enough to compute by hand."""
import math

import pytest
import torch

from tarflow import Model
from tarflow.metrics import crm, crm_shares, igm

S, U = 0.5, -0.25  # the block predicts a_t = S * x_{t-1}, b_t = U * x_{t-1}


def linear_block():
    """One block over T=4 scalar tokens whose transformer is the identity on proj_in's output.

    Attention and MLP outputs are zeroed, so h_t = proj_in(x_t) and the flow is
    a_t = S x_{t-1}, b_t = U x_{t-1}: every quantity below has a closed form."""
    model = Model(in_channels=1, img_size=2, patch_size=1, channels=4, num_blocks=1, layers_per_block=1, head_dim=4)
    block = model.blocks[0]
    with torch.no_grad():
        for p in block.parameters():
            p.zero_()
        block.proj_in.weight[0, 0] = 1.0
        block.proj_out.weight[0, 0] = S  # log-scale row
        block.proj_out.weight[1, 0] = U  # shift row
    return block.eval()


def encode(xs):
    """z of the linear block, by hand."""
    z = [xs[0]]
    for t in range(1, len(xs)):
        z.append((xs[t] - U * xs[t - 1]) * math.exp(-S * xs[t - 1]))
    return z


def jacobi_step(z, guess):
    return [z[0]] + [z[t] * math.exp(S * guess[t - 1]) + U * guess[t - 1] for t in range(1, len(z))]


@pytest.fixture
def batch():
    xs = [[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, -1.0, 2.0]]
    x = torch.tensor(xs).view(2, 4, 1)
    return xs, x


def test_crm_matches_the_closed_form(batch):
    xs, x = batch
    block = linear_block()
    got = crm(block, x)
    # alpha_t = exp(-S x_{t-1}) for t >= 1, alpha_0 = 1; a (T, 1) matrix's 2-norm is its vector norm
    alpha_x = [[r[0]] + [math.exp(-S * r[t - 1]) * r[t] for t in range(1, 4)] for r in xs]
    mean = [(alpha_x[0][t] + alpha_x[1][t]) / 2 for t in range(4)]
    assert got.mean_alpha_x == pytest.approx(math.sqrt(sum(m * m for m in mean)), rel=1e-9)
    assert got.scale_weight == pytest.approx(abs(S)) and got.shift_weight == pytest.approx(abs(U))
    assert got.value == pytest.approx(got.mean_alpha_x * abs(S) + abs(U), rel=1e-12)


@pytest.mark.parametrize("init", ["z", "zeros"])
def test_igm_matches_the_closed_form(batch, init):
    xs, x = batch
    block = linear_block()
    z = torch.tensor([encode(r) for r in xs]).view(2, 4, 1)
    assert torch.allclose(block(x)[0], z, atol=1e-6)  # the hand encoder is the block's
    residuals = []
    for r in xs:
        zr = encode(r)
        guess = zr if init == "z" else [zr[0], 0.0, 0.0, 0.0]
        residuals.append([a - b for a, b in zip(jacobi_step(zr, guess), r)])
    mean = [(residuals[0][t] + residuals[1][t]) / 2 for t in range(4)]
    assert igm(block, z, x, init) == pytest.approx(math.sqrt(sum(m * m for m in mean)), rel=1e-5)


def test_igm_rejects_unknown_guesses(batch):
    xs, x = batch
    block = linear_block()
    z = block(x)[0]
    with pytest.raises(ValueError, match="init='ones'.*z, zeros"):
        igm(block, z, x, "ones")


def test_crm_shares_sum_to_one():
    assert crm_shares([1.0, 3.0]) == [0.25, 0.75]
    assert crm_shares([0.0, 0.0]) == [0.5, 0.5]
