"""Per-sample noise: sample i of a run depends on (seed, i) alone.

So the same sample id gets the same image however work is split into batches,
shards, processes or machines."""
from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch


def sample_generator(seed: int, sample_id: int) -> torch.Generator:
    """A CPU generator seeded from a hash of (seed, sample_id), so nearby ids give unrelated streams."""
    digest = hashlib.sha256(f"tarflow-gs:{int(seed)}:{int(sample_id)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def sample_noise(seed: int, ids: Iterable[int], num_tokens: int, token_dim: int,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal noise (len(ids), num_tokens, token_dim), row k drawn from (seed, ids[k])."""
    ids = [int(i) for i in ids]
    if not ids:
        return torch.empty(0, num_tokens, token_dim, device=device)
    noise = torch.stack([torch.randn(num_tokens, token_dim, generator=sample_generator(seed, i)) for i in ids])
    return noise.to(device)
