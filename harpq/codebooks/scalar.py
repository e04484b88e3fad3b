"""Uniform scalar grids with per-group scale and zero-point (the RTN/GPTQ/HQQ family).

Groups are runs of `group_size` consecutive input columns of a row (0: one group per row). Scales are
rounded to fp16 *before* rounding the weights, so the grid the rounding algorithm sees is exactly the
grid that is stored and decoded (by the `ScalarGroups` storage format).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import HarpqError
from ..formats import ScalarGroups
from .base import Codebook
from .hqq import hqq_solve

SCALAR_BITS = (1, 2, 3, 4, 8)


def fp16_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value ≥ x (as float32): a stored scale never shrinks the grid below the range."""
    h = x.half()
    up = torch.nextafter(h, torch.full_like(h, float("inf")))
    return torch.where(h.float() < x, up, h).float()


SCALE_RULES = ("minmax", "rms", "hqq")
RMS_RANGE = 2.4  # QuIP's grid: 2^b points on ±2.4·RMS(W̃), one scale per matrix


class ScalarGrid(Codebook):
    """Uniform grid w ≈ scale · (q − zero), q in [0, 2^bits).

    `minmax`: asymmetric, an fp16 scale and an integer zero per group (RTN/GPTQ).
    `rms`: symmetric on ±2.4·RMS of the whole matrix, one fp16 scale, zero = (2^b − 1)/2 (QuIP).
    `hqq`: min–max scale, fractional fp16 zero per group fitted by HQQ's half-quadratic solver (no data).
    """

    name = "scalar"
    dim = 1

    def __init__(self, bits: int, group_size: int = 128, ragged_groups: bool = False, scale: str = "minmax",
                 row_tile: int = 16):
        if bits not in SCALAR_BITS:
            raise HarpqError(f"the scalar codebook offers {', '.join(map(str, SCALAR_BITS))} bits, not {bits}")
        if group_size < 0 or 0 < group_size < 8:
            raise HarpqError(f"group size must be 0 (one group per row) or at least 8, not {group_size}")
        if scale not in SCALE_RULES:
            raise HarpqError(f"unknown scale rule {scale!r} (offered: {', '.join(SCALE_RULES)})")
        self.scale_rule = scale
        if scale == "rms":
            group_size = 0
        self.bits = bits
        self.group_size = group_size
        self.ragged_groups = ragged_groups
        self.maxq = (1 << bits) - 1
        self.row_tile = row_tile  # the storage layout of the codes (`ScalarGroups`)

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "bits": self.bits,
            "group_size": self.group_size,
            "ragged_groups": self.ragged_groups,
            "scale": self.scale_rule,
            "row_tile": self.row_tile,
        }

    def group_len(self, in_features: int) -> int:
        return self.group_size if self.group_size else in_features

    def num_groups(self, in_features: int) -> int:
        g = self.group_len(in_features)
        return (in_features + g - 1) // g

    def check_shape(self, out_features: int, in_features: int, name: str) -> None:
        g = self.group_size
        if g == 0:
            return
        if g > in_features:
            raise HarpqError(f"group size {g} exceeds in_features {in_features} of {name}")
        if in_features % g and not self.ragged_groups:
            divisors = [d for d in range(8, in_features + 1) if in_features % d == 0][:6]
            raise HarpqError(
                f"group size {g} does not divide in_features {in_features} of {name} "
                f"(divisors: {', '.join(map(str, divisors))}; or allow a shorter last group: --ragged-groups)"
            )

    def prepare(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        m, n = weight.shape
        if self.scale_rule == "hqq":
            return self._prepare_hqq(weight)
        if self.scale_rule == "rms":
            rms = weight.float().pow(2).mean().sqrt().clamp(min=1e-12)
            scale = fp16_ceil(2 * RMS_RANGE * rms / self.maxq).expand(m, 1)
            zero = torch.full((m, 1), self.maxq / 2, device=weight.device)
            return {"scale": scale, "zero": zero, "group_index": torch.zeros(n, dtype=torch.long, device=weight.device)}
        g = self.group_len(n)
        groups = self.num_groups(n)
        w = torch.nn.functional.pad(weight.float(), (0, groups * g - n))
        w = w.view(m, groups, g)
        if groups * g != n:  # padding of a ragged last group must not widen its range
            last = weight[:, (groups - 1) * g :].float()
            lo = torch.cat([w[:, :-1].amin(-1), last.amin(-1, keepdim=True)], 1)
            hi = torch.cat([w[:, :-1].amax(-1), last.amax(-1, keepdim=True)], 1)
        else:
            lo, hi = w.amin(-1), w.amax(-1)
        lo = lo.clamp(max=0)
        hi = hi.clamp(min=0)
        flat = hi == lo
        lo = torch.where(flat, torch.full_like(lo, -1.0), lo)
        hi = torch.where(flat, torch.full_like(hi, 1.0), hi)
        scale = fp16_ceil((hi - lo) / self.maxq)
        zero = torch.round(-lo / scale).clamp(0, self.maxq)
        group_index = torch.arange(n, device=weight.device) // g
        return {"scale": scale, "zero": zero, "group_index": group_index}

    def _prepare_hqq(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        m, n = weight.shape
        g = self.group_len(n)
        whole = n // g * g
        scales, zeros = [], []
        if whole:
            sc, z = hqq_solve(weight[:, :whole].reshape(-1, g), self.bits)
            scales.append(sc.view(m, -1))
            zeros.append(z.view(m, -1))
        if whole < n:  # a ragged last group is solved on its own
            sc, z = hqq_solve(weight[:, whole:], self.bits)
            scales.append(sc.view(m, 1))
            zeros.append(z.view(m, 1))
        scale = torch.cat(scales, 1).half().float()  # nearest fp16: HQQ's grid may clip, no need to round up
        zero = torch.cat(zeros, 1).half().float()
        return {"scale": scale, "zero": zero, "group_index": torch.arange(n, device=weight.device) // g}

    def round(
        self, x: torch.Tensor, cols: torch.Tensor, state: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        gidx = state["group_index"][cols]
        scale = state["scale"][:, gidx].to(x.dtype)
        zero = state["zero"][:, gidx].to(x.dtype)
        whole = zero.floor()  # GPTQ's round(x/s) + z for integer zeros; QuIP's half-integer zero rounds x/s + ½
        q = torch.clamp(torch.round(x / scale + (zero - whole)) + whole, 0, self.maxq)
        return q.to(torch.uint8), scale * (q - zero)

    @property
    def storage(self) -> ScalarGroups:
        return ScalarGroups(self.bits, self.group_size, {"minmax": "int", "hqq": "fp16", "rms": "mid"}[self.scale_rule],
                            self.row_tile)

    def encode(self, codes: torch.Tensor, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.storage.encode(codes, state["scale"], state["zero"])
