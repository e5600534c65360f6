"""TarFlow (Zhai et al. 2024), state-dict compatible with apple/ml-tarflow.

A stack of autoregressive affine flow blocks over patch tokens. Block i sees the
tokens in identity (even i) or flipped (odd i) order; its transformer reads the
tokens causally and predicts, for token t, a log-scale a_t and shift b_t from
tokens < t. Forward (encode): z_t = (x_t - b_t) * exp(-a_t). Inversion
(sampling) lives in `solvers.py`, which drives `MetaBlock.params` with a KV cache.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ModelConfig:
    in_channels: int
    img_size: int
    patch_size: int
    channels: int
    num_blocks: int
    layers_per_block: int
    num_classes: int = 0
    nvp: bool = True
    head_dim: int = 64

    @property
    def num_tokens(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:
        return self.in_channels * self.patch_size**2

    def validate(self) -> "ModelConfig":
        for name in ("in_channels", "img_size", "patch_size", "channels", "num_blocks", "layers_per_block", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.img_size % self.patch_size:
            raise ValueError(f"ModelConfig.img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
        if self.channels % self.head_dim:
            raise ValueError(f"ModelConfig.channels={self.channels} is not a multiple of head_dim={self.head_dim}")
        if self.num_classes < 0:
            raise ValueError(f"ModelConfig.num_classes must be >= 0, got {self.num_classes}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache:
    """Preallocated keys/values for every layer of one block, written in place.

    Allocated on first write, in `dtype` or else the dtype the layer computes in (bfloat16 under
    autocast)."""

    def __init__(self, num_layers: int, max_len: int, dtype: torch.dtype | None = None):
        self.max_len, self.dtype = max_len, dtype
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is None:
            B, H, _, E = k.shape
            self.k[layer] = k.new_empty(B, H, self.max_len, E, dtype=self.dtype or k.dtype)
            self.v[layer] = v.new_empty(B, H, self.max_len, E, dtype=self.dtype or v.dtype)
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


CAUSAL = "causal"  # an attention mask: each query sees the keys up to its own position, and no cached prefix


def _norm_fp32(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm in at least fp32 (as the reference), back in the input's dtype."""
    return norm(x.to(torch.promote_types(x.dtype, torch.float32))).type(x.dtype)


class Attention(nn.Module):
    def __init__(self, channels: int, head_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.num_heads = channels // head_dim

    def forward(self, x, mask=None, cache=None, layer: int = 0, start: int | torch.Tensor = 0, q_scale=None):
        """`start`: where the queries' keys go in `cache`, the first position (KVCache) or each query's
        position on the device (the static engine's cache, which a captured pass indexes without the host)."""
        B, L, C = x.shape
        h = _norm_fp32(self.norm, x)
        # fused q|k|v, heads in order: (B, L, 3H, E) -> (B, 3H, L, E) -> 3 x (B, H, L, E)
        q, k, v = self.qkv(h).reshape(B, L, 3 * self.num_heads, -1).transpose(1, 2).chunk(3, dim=1)
        if q_scale is not None:
            # dividing the logits by a per-sample temperature == scaling q
            q = q * q_scale.to(q.dtype)
        if cache is not None:
            k, v = cache.write(layer, start, k, v)
        if mask is CAUSAL:  # queries and keys are the same positions: the kernel skips the upper triangle
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class MLP(nn.Module):
    def __init__(self, channels: int, expansion: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.main = nn.Sequential(
            nn.Linear(channels, channels * expansion), nn.GELU(), nn.Linear(channels * expansion, channels)
        )

    def forward(self, x):
        return self.main(_norm_fp32(self.norm, x))


class AttentionBlock(nn.Module):
    def __init__(self, channels: int, head_dim: int, expansion: int = 4):
        super().__init__()
        self.attention = Attention(channels, head_dim)
        self.mlp = MLP(channels, expansion)

    def forward(self, x, mask=None, cache=None, layer=0, start=0, q_scale=None):
        x = x + self.attention(x, mask, cache, layer, start, q_scale)
        return x + self.mlp(x)


class MetaBlock(nn.Module):
    """One autoregressive affine flow block."""

    attn_mask: torch.Tensor

    def __init__(self, token_dim, channels, num_tokens, flip, num_layers, head_dim=64, nvp=True, num_classes=0):
        super().__init__()
        self.flip = flip
        self.nvp = nvp
        self.token_dim = token_dim
        self.proj_in = nn.Linear(token_dim, channels)
        self.pos_embed = nn.Parameter(torch.randn(num_tokens, channels) * 1e-2)
        self.class_embed = nn.Parameter(torch.randn(num_classes, 1, channels) * 1e-2) if num_classes else None
        self.attn_blocks = nn.ModuleList(AttentionBlock(channels, head_dim) for _ in range(num_layers))
        self.proj_out = nn.Linear(channels, 2 * token_dim if nvp else token_dim)
        self.proj_out.weight.data.zero_()  # starts as the identity flow
        self.register_buffer("attn_mask", torch.tril(torch.ones(num_tokens, num_tokens)))

    def permute(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return x.flip(dim) if self.flip else x

    def class_embedding(self, y: torch.Tensor | None, batch: int) -> torch.Tensor | float:
        """(B, 1, C) class embedding; the mean embedding where y is None or y < 0."""
        if self.class_embed is None:
            return 0.0
        mean = self.class_embed.mean(dim=0)
        if y is None:
            return mean.expand(batch, 1, -1)
        return torch.where((y < 0).view(-1, 1, 1), mean, self.class_embed[y.clamp(min=0)])

    def params(self, x_perm, pos, cond=0.0, mask=None, cache=None, start=0, q_scale=None):
        """(a, b) predicted from tokens x_perm (B, L, D) at permuted positions start..start+L-1 (`start` as in
        `Attention.forward`).

        `pos` is the permuted position embedding of those L positions. Row i holds the
        parameters of token start+i+1: the output is not yet shifted."""
        h = self.proj_in(x_perm) + pos + cond
        for i, layer in enumerate(self.attn_blocks):
            h = layer(h, mask, cache, i, start, q_scale)
        out = self.proj_out(h)
        if self.nvp:
            return out.chunk(2, dim=-1)
        return torch.zeros_like(out), out

    def forward(self, x, y=None):
        """Encode: (B, T, D) -> (z, logdet per sample)."""
        x = self.permute(x)
        pos = self.permute(self.pos_embed, 0)
        a, b = self.params(x, pos, self.class_embedding(y, x.shape[0]), self.attn_mask.bool())
        # shift right one token: token t's parameters come from tokens < t, token 0 passes through
        a = torch.cat([torch.zeros_like(a[:, :1]), a[:, :-1]], dim=1)
        b = torch.cat([torch.zeros_like(b[:, :1]), b[:, :-1]], dim=1)
        z = (x - b) * (-a.to(torch.promote_types(a.dtype, torch.float32))).exp().type(a.dtype)
        return self.permute(z), -a.mean(dim=[1, 2])


class Model(nn.Module):
    var: torch.Tensor
    VAR_LR = 0.1  # EMA rate of the prior variance, as the reference trainer

    def __init__(self, in_channels, img_size, patch_size, channels, num_blocks, layers_per_block,
                 num_classes=0, nvp=True, head_dim=64):
        super().__init__()
        self.config = ModelConfig(in_channels, img_size, patch_size, channels, num_blocks, layers_per_block,
                                  num_classes, nvp, head_dim).validate()
        T, D = self.config.num_tokens, self.config.token_dim
        self.blocks = nn.ModuleList(
            MetaBlock(D, channels, T, i % 2 == 1, layers_per_block, head_dim, nvp, num_classes) for i in range(num_blocks)
        )
        self.register_buffer("var", torch.ones(T, D))

    @classmethod
    def from_config(cls, config: ModelConfig) -> "Model":
        return cls(**config.to_dict())

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def token_dim(self) -> int:
        return self.config.token_dim

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        p = self.config.patch_size
        return F.unfold(x, p, stride=p).transpose(1, 2)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        s, p = self.config.img_size, self.config.patch_size
        return F.fold(x.transpose(1, 2), (s, s), p, stride=p)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None):
        """Images (B, C, H, W) -> (z tokens (B, T, D), logdet per sample summed over blocks)."""
        x = self.patchify(x)
        logdet = torch.zeros(x.shape[0], device=x.device)
        for block in self.blocks:
            x, ld = block(x, y)
            logdet = logdet + ld
        return x, logdet

    def forward(self, x, y=None):
        return self.encode(x, y)

    def nll_loss(self, z: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
        """The reference training loss: Gaussian prior term minus mean log-determinant (per dim)."""
        return 0.5 * z.pow(2).mean() - logdet.mean()

    def update_prior(self, z: torch.Tensor) -> None:
        self.var.lerp_((z.detach() ** 2).mean(dim=0), self.VAR_LR)

    def bits_per_dim(self, z: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
        """Per-sample bits/dim of images scaled from 8-bit [0, 255] to [-1, 1] (hence log 127.5)."""
        nll = 0.5 * (z.pow(2).mean(dim=[1, 2]) + math.log(2 * math.pi)) - logdet
        return (nll + math.log(127.5)) / math.log(2.0)
