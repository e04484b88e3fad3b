"""Incoherence μ of a weight and of a Hessian (QuIP Def. 2.1): how peaked their entries are.

μ_W = max|W_ij| · √(mn) / ‖W‖_F and μ_H = max|Q_ij| · √n for H = QΛQᵀ; both are 1 at best and grow
with outliers. Processors exist to bring them down.
"""

from __future__ import annotations

import math

import torch

EIGH_LIMIT = 8192  # an eigendecomposition above this size costs more than it tells


def weight_incoherence(weight: torch.Tensor) -> float:
    w = weight.to(torch.float64)
    return float(w.abs().max() * math.sqrt(w.numel()) / w.norm().clamp(min=1e-30))


def hessian_incoherence(hessian: torch.Tensor) -> float | None:
    n = hessian.shape[0]
    if n > EIGH_LIMIT:
        return None
    vecs = torch.linalg.eigh(hessian.to(torch.float64))[1]
    return float(vecs.abs().max() * math.sqrt(n))
