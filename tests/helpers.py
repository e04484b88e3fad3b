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


def gptq_reference(w, h, codebook, state, damp=0.01, perm=None):
    """The textbook GPTQ loop: one column at a time, H⁻¹ upper Cholesky, no lazy batching."""
    n = w.shape[1]
    perm = torch.arange(n) if perm is None else perm
    w = w[:, perm].clone()
    h = h[perm][:, perm] + damp * torch.diagonal(h).mean() * torch.eye(n, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i in range(n):
        _, q[:, i : i + 1] = codebook.round(w[:, i : i + 1], perm[i : i + 1], state)
        err = (w[:, i : i + 1] - q[:, i : i + 1]) / hinv[i, i]
        w[:, i:] -= err @ hinv[i : i + 1, i:]
    return q[:, torch.argsort(perm)]


def ldl_block_reference(w, h, codebook, state, g, damp=0.01):
    """QuIP#'s BlockLDLQ as written in the paper: g-block LDL of H, sweep blocks last to first."""
    n = w.shape[1]
    h = h + damp * torch.diagonal(h).mean() * torch.eye(n, dtype=h.dtype)
    c = torch.linalg.cholesky(h)
    blocks = [c[i : i + g, i : i + g] for i in range(0, n, g)]
    lower = c @ torch.block_diag(*[torch.linalg.inv(b) for b in blocks])
    q = torch.zeros_like(w)
    for k in reversed(range(0, n, g)):
        x = w[:, k : k + g] + (w[:, k + g :] - q[:, k + g :]) @ lower[k + g :, k : k + g]
        _, q[:, k : k + g] = codebook.round(x, torch.arange(k, k + g), state)
    return q
