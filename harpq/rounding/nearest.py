"""Round every weight group to its nearest codeword, independently (RTN)."""

from __future__ import annotations

import torch

from ..codebooks.base import Codebook


def nearest(
    weight: torch.Tensor, codebook: Codebook, state: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (codes, reconstruction) of the whole matrix."""
    cols = torch.arange(weight.shape[1], device=weight.device)
    return codebook.round(weight, cols, state)
