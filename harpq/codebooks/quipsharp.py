"""QuIP#'s lattice codebooks: E8P at 2 bits, and residual VQ on top of it at 3 and 4 bits.

One scale per matrix: the codebook sees W̃ · ρ / RMS(W̃). 2 bits: E8P alone (ρ = 0.9, QuIP#'s choice
for models). 3 bits: E8P (ρ = 0.98), then the 256-point 1-bit E8 codebook on the residual × 2.04.
4 bits: E8P (ρ = 1.03), then E8P again on the residual × 3.45. Codes are 16 bits per 8 weights per
E8P stage and 8 bits for the 1-bit E8 stage: exactly 2, 3 or 4 bits per weight.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import HarpqError
from ..formats import E8PStages
from ..formats.lattice import e8_one_bit_points
from .base import Codebook
from .e8p import e8p_nearest
from .scalar import fp16_ceil

STAGE_ONE_SCALE = {2: 0.9, 3: 0.98, 4: 1.03}
RESIDUAL_SCALE = {3: 2.04, 4: 3.45}


def e8_one_bit_nearest(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest of the 256-point 1-bit E8 codebook: x (N, 8) -> (codes, points)."""
    pts = e8_one_bit_points().to(device=x.device, dtype=x.dtype)
    idx = ((pts * pts).sum(1)[None, :] - 2 * x @ pts.T).argmin(1)
    return idx, pts[idx]


class E8PCodebook(Codebook):
    name = "e8p"
    dim = 8

    def __init__(self, bits: int = 2, scale: float | None = None, resid_scale: float | None = None,
                 row_tile: int | None = None):
        if bits not in STAGE_ONE_SCALE:
            raise HarpqError(f"the e8p codebook offers 2, 3 and 4 bits, not {bits}")
        self.bits = bits
        # the storage layout of the codes (`E8PStages`): row-tiled for the residual formats, which decode
        # 2–9 % faster that way on the H200; at 2 bits the tiled decode of 4096-row matrices needs 154
        # registers instead of 128 and ran 13–16 % slower at batch 1 (benchmarks/RESULTS.md)
        self.row_tile = (16 if bits > 2 else 0) if row_tile is None else row_tile
        self.rho = STAGE_ONE_SCALE[bits] if scale is None else float(scale)
        self.resid = RESIDUAL_SCALE.get(bits) if resid_scale is None else float(resid_scale)
        if self.rho <= 0 or (self.resid is not None and self.resid <= 0):
            raise HarpqError("e8p scales must be positive")

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits, "scale": self.rho, "resid_scale": self.resid,
                "row_tile": self.row_tile}

    def check_shape(self, out_features: int, in_features: int, name: str) -> None:
        if in_features % 8:
            raise HarpqError(f"in_features {in_features} of {name} is not a multiple of 8 (e8p codes 8 at a time)")

    def prepare(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        rms = weight.float().pow(2).mean().sqrt().clamp(min=1e-12)
        return {"scale": fp16_ceil(rms / self.rho).reshape(1, 1).to(weight.device)}

    def _quantize(self, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """y (N, 8) in codebook units -> ([codes per stage], reconstruction)."""
        c1, q1 = e8p_nearest(y)
        if self.bits == 2:
            return [c1], q1
        r = (y - q1) * self.resid
        c2, q2 = e8_one_bit_nearest(r) if self.bits == 3 else e8p_nearest(r)
        return [c1, c2], q1 + q2 / self.resid

    def round(self, x: torch.Tensor, cols: torch.Tensor, state: dict[str, torch.Tensor]):
        m, k = x.shape
        s = state["scale"].to(x.dtype)
        codes, q = self._quantize((x / s).reshape(-1, 8))
        stacked = torch.stack(codes, dim=-1).view(m, k // 8 * len(codes))
        return stacked, q.view(m, k) * s

    @property
    def storage(self) -> E8PStages:
        return E8PStages(self.bits, self.resid, self.row_tile)

    def encode(self, codes: torch.Tensor, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        m = codes.shape[0]
        stages = 1 if self.bits == 2 else 2
        c = codes.view(m, -1, stages).to(torch.int64)
        return self.storage.encode(c[..., 0], c[..., 1] if stages == 2 else None, state["scale"])
