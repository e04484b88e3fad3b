"""BlockLDLQ: adaptive rounding with linear feedback from the LDL factor of the Hessian.

One implementation for every codebook: g = codebook.dim columns are rounded jointly (g = 1 is
GPTQ/OPTQ/LDLQ, g = 8 is QuIP#'s BlockLDLQ). It is written in GPTQ's form: with H⁻¹ = UᵀU (U upper
triangular, U_kk its g×g diagonal blocks), rounding block k leaves the error e_k = (w_k − ŵ_k) U_kk⁻¹,
which is fed forward as W[:, >k] −= e_k U[k, >k]. The proxy loss of the result is Σ_k e_k e_kᵀ, i.e.
η_k D_k η_kᵀ of QuIP#'s LDL form (the tests check this identity). Updates beyond the current batch of
`batch` columns are applied lazily, once per batch.
"""

from __future__ import annotations

import logging

import torch

from ..codebooks.base import Codebook

log = logging.getLogger(__name__)


def damped_inverse_cholesky(hessian: torch.Tensor, damp: float, retries: int = 6) -> tuple[torch.Tensor, float]:
    """Upper factor U of (H + λI)⁻¹ = UᵀU with λ = damp · mean(diag H), in float64.

    An ill-conditioned H is damped ten times harder and retried; returns U and the damping used.
    """
    h = hessian.to(torch.float64)
    mean_diag = torch.diagonal(h).mean().clamp(min=1e-12)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(retries):
        lam = damp if attempt == 0 else max(damp, 1e-4) * 10**attempt
        chol, info = torch.linalg.cholesky_ex(h + lam * mean_diag * eye)
        if info == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if info == 0:
                if attempt:
                    log.info("Hessian needed damping %.3g (asked for %.3g)", lam, damp)
                return upper, lam
    raise torch.linalg.LinAlgError(f"Hessian is not positive definite even with damping {lam:g}")


def block_order(hessian: torch.Tensor, g: int, act_order: bool) -> torch.Tensor:
    """Column order: natural, or blocks of g by descending Hessian diagonal mass (GPTQ's act-order)."""
    n = hessian.shape[0]
    if not act_order:
        return torch.arange(n, device=hessian.device)
    mass = torch.diagonal(hessian).reshape(n // g, g).sum(1)
    blocks = torch.argsort(mass, descending=True, stable=True)
    return (blocks[:, None] * g + torch.arange(g, device=hessian.device)).reshape(-1)


def block_ldlq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    codebook: Codebook,
    state: dict[str, torch.Tensor],
    damp: float = 0.01,
    act_order: bool = False,
    batch: int = 128,
    tune_passes: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Round `weight` (m, n) against `hessian` (n, n) -> (codes, reconstruction, damping used).

    Works in weight.dtype (float32 normally, float64 for exact tests). Columns whose Hessian diagonal
    is zero (inputs that never fire) are quantized from zero feedback, as GPTQ does. `tune_passes`
    sweeps of block coordinate descent follow (QuIP#'s tune iterations):
    ŵ_k ← Q(ŵ_k + (W − Ŵ) H[:, k] H[k, k]⁻¹), a block kept only if the proxy loss drops.
    """
    m, n = weight.shape
    g = codebook.dim
    if n % g:
        raise ValueError(f"in_features {n} is not a multiple of the codebook dimension {g}")
    batch = max(g, batch - batch % g)
    h = hessian.to(torch.float64).clone()
    w = weight.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    perm = block_order(h, g, act_order)
    w = w[:, perm]
    h = h[perm][:, perm]
    upper, used = damped_inverse_cholesky(h, damp)
    upper = upper.to(w.dtype)
    original = w.clone() if tune_passes else None

    recon = torch.empty_like(w)
    codes_by_block: list[torch.Tensor] = []
    for b0 in range(0, n, batch):
        b1 = min(b0 + batch, n)
        w1 = w[:, b0:b1].clone()
        err1 = torch.empty_like(w1)
        for k in range(0, b1 - b0, g):
            blk = slice(k, k + g)
            x = w1[:, blk]
            codes, xhat = codebook.round(x, perm[b0 + k : b0 + k + g], state)
            codes_by_block.append(codes)
            recon[:, b0 + k : b0 + k + g] = xhat
            u_kk = upper[b0 + k : b0 + k + g, b0 + k : b0 + k + g]
            err = torch.linalg.solve_triangular(u_kk, x - xhat, upper=True, left=False)
            err1[:, blk] = err
            w1[:, k + g :] -= err @ upper[b0 + k : b0 + k + g, b0 + k + g : b1]
        w[:, b1:] -= err1 @ upper[b0:b1, b1:]

    if tune_passes:
        h = (h + used * torch.diagonal(h).mean() * torch.eye(n, dtype=h.dtype, device=h.device)).to(w.dtype)
        _tune(original, recon, codes_by_block, h, codebook, state, perm, g, tune_passes)

    block_inverse = torch.argsort(perm.reshape(-1, g)[:, 0] // g)
    codes = torch.stack(codes_by_block, dim=1)[:, block_inverse].reshape(m, -1)
    return codes, recon[:, torch.argsort(perm)], used


def _tune(w, recon, codes_by_block, h, codebook, state, perm, g, passes) -> None:
    """Block coordinate descent on tr((Ŵ − W) H (Ŵ − W)ᵀ), in place, in the rounding order."""
    n = w.shape[1]
    for _ in range(passes):
        for b, k in enumerate(range(0, n, g)):
            blk = slice(k, k + g)
            h_kk = h[blk, blk]
            target = recon[:, blk] + torch.linalg.solve(h_kk, ((w - recon) @ h[:, blk]).T).T
            codes, xhat = codebook.round(target, perm[blk], state)
            old = recon[:, blk] - w[:, blk]
            new = xhat - w[:, blk]
            # change of the proxy loss when only block k moves: Δ = (new−old)·(2·E·H[:,k]ₒₜₕₑᵣ) + quadratic terms
            rest = (recon - w) @ h[:, blk] - old @ h_kk  # E_{−k} H[−k, k]
            gain = (2 * ((old - new) * rest).sum(1) + ((old @ h_kk) * old).sum(1) - ((new @ h_kk) * new).sum(1))
            keep = gain > 0  # per row: accept only improvements
            recon[keep, blk] = xhat[keep]
            codes_by_block[b][keep] = codes[keep]
