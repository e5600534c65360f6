"""CRM and IGM: the GS-Jacobi paper's per-block diagnostics (Liu & Qin, arXiv 2505.12849).

Both are computed from a calibration batch whose true per-block solution is known
(training images pushed through `encode`, or the model's own sequential samples).
Definitions follow the authors' public code (GS_Jacobi_sampling.py, detect mode):

- CRM (convergence ranking metric) of a block with true input X (B, T, D):
      ||mean_n(alpha * X)||_2 * ||W_s||_2 + ||W_u||_2
  with alpha = exp(-a) the forward scale of each token, W_s and W_u the log-scale
  and shift rows of `proj_out`, all norms spectral (matrix 2-norms). Large CRM: a
  "tough" block that needs many Jacobi iterations.
- IGM (initial guessing metric) of a guess G (the block's z, or zeros after token 0):
      ||mean_n(X1 - X)||_2,   X1 = one Jacobi step from G
  Smaller is the better start.

The batch mean is taken before the norm, as the authors do: the metrics rank blocks
and guesses, they do not bound any single sample's error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import MetaBlock
from .plan import INIT_NAMES
from .schema import STRICT_FIELDS
from .solvers import jacobi_trace
from .spec import Guidance


@dataclass(frozen=True)
class CRM:
    mean_alpha_x: float  # ||mean_n(alpha * X)||_2
    scale_weight: float  # ||W_s||_2
    shift_weight: float  # ||W_u||_2

    __pydantic_config__ = STRICT_FIELDS

    @property
    def value(self) -> float:
        return self.mean_alpha_x * self.scale_weight + self.shift_weight


def spectral_norm(m: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(m.double(), ord=2))


@torch.inference_mode()
def crm(block: MetaBlock, x: torch.Tensor, labels: torch.Tensor | None = None) -> CRM:
    """CRM of `block` at its true input x (B, T, D), tokens in model (unpermuted) order."""
    xp = block.permute(x.float())
    pos = block.permute(block.pos_embed, 0)
    a, _ = block.params(xp, pos, block.class_embedding(labels, xp.shape[0]), block.attn_mask.bool())
    a = torch.cat([torch.zeros_like(a[:, :1]), a[:, :-1]], dim=1)  # token t's scale comes from tokens < t
    alpha_x = (-a.double()).exp() * xp.double()
    w = block.proj_out.weight
    # without nvp the block only shifts: a = 0, so W_s is empty and contributes nothing
    w_s, w_u = w.chunk(2, dim=0) if block.nvp else (w[:0], w)
    return CRM(spectral_norm(alpha_x.mean(0)), spectral_norm(w_s) if w_s.numel() else 0.0, spectral_norm(w_u))


def crm_shares(values: list[float]) -> list[float]:
    """Each block's CRM as a fraction of the total (the paper reports percentages)."""
    total = sum(values)
    return [v / total if total > 0 else 1.0 / len(values) for v in values]


@torch.inference_mode()
def igm(block: MetaBlock, z: torch.Tensor, x: torch.Tensor, init: str, labels: torch.Tensor | None = None,
        guidance: Guidance = Guidance()) -> float:
    """IGM of guess `init` ('z' or 'zeros'): the block maps x -> z; both (B, T, D) in model order."""
    if init not in INIT_NAMES:
        raise ValueError(f"init={init!r}: allowed values are {', '.join(INIT_NAMES)}")
    (x1,) = jacobi_trace(block, z.float(), labels, init, guidance, max_iters=1, keep_iterates=True).iterates
    return spectral_norm((x1 - x.float()).mean(0))
