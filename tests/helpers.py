"""Shared test data builders."""

from __future__ import annotations

import torch


def random_hessian(n: int, seed: int = 0, tokens: int = 4096) -> torch.Tensor:
    """A realistic-looking H = E[xxᵀ]: correlated inputs with a few strong outlier channels."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix + 0.3 * torch.randn(
        tokens, n, generator=g, dtype=torch.float64)
    x[:, :3] *= 8.0
    return x.T @ x / tokens
