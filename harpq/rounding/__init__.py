"""Rounding: nearest, or (Block)LDLQ driven by the proxy loss tr((Ŵ−W) H (Ŵ−W)ᵀ)."""

from __future__ import annotations

import torch

from ..codebooks.base import Codebook
from ..errors import HarpqError
from .ldlq import block_ldlq, damped_inverse_cholesky
from .nearest import nearest

ROUNDINGS = ("nearest", "ldlq")


def round_weight(
    rounding: str,
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    codebook: Codebook,
    state: dict[str, torch.Tensor],
    damp: float = 0.01,
    act_order: bool = False,
    tune_passes: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (codes, reconstruction) of a processed weight matrix."""
    if rounding == "nearest":
        return nearest(weight, codebook, state)
    if rounding == "ldlq":
        if hessian is None:
            raise HarpqError("ldlq rounding needs calibration data (a Hessian)")
        codes, recon, _ = block_ldlq(weight, hessian, codebook, state, damp=damp, act_order=act_order,
                                     tune_passes=tune_passes)
        return codes, recon
    raise HarpqError(f"unknown rounding {rounding!r} (offered: {', '.join(ROUNDINGS)})")


def proxy_loss(weight: torch.Tensor, recon: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ): the share of the layer's output energy lost to quantization."""
    w = weight.to(torch.float64)
    h = hessian.to(torch.float64)
    delta = recon.to(torch.float64) - w
    num = ((delta @ h) * delta).sum()
    den = ((w @ h) * w).sum().clamp(min=1e-30)
    return float(num / den)


__all__ = ["ROUNDINGS", "block_ldlq", "damped_inverse_cholesky", "nearest", "proxy_loss", "round_weight"]
