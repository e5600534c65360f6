"""Per-sample prior noise keyed by (global seed, sample id).

Sample i's noise depends on (seed, i) alone, never on the batch it lands in or the
worker that draws it, so any split of the ids over batches, processes or machines
reproduces the same images."""
from __future__ import annotations

import hashlib
from typing import Iterable

import torch


def sample_seed(seed: int, sample_id: int) -> int:
    """A stable 63-bit generator seed for one sample (blake2b, so it does not vary across Python runs)."""
    digest = hashlib.blake2b(f"tarflow-gs:{int(seed)}:{int(sample_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_noise(seed: int, ids: Iterable[int], num_tokens: int, token_dim: int) -> torch.Tensor:
    """Standard normal noise (len(ids), num_tokens, token_dim), float32 on CPU, row k drawn from (seed, ids[k])."""
    rows = []
    for sample_id in ids:
        g = torch.Generator().manual_seed(sample_seed(seed, sample_id))
        rows.append(torch.randn(num_tokens, token_dim, generator=g))
    if not rows:
        return torch.empty(0, num_tokens, token_dim)
    return torch.stack(rows)
