"""Which kernel computes x · Ŵᵀ for a codebook's stored tensors, and the small per-module inputs it needs."""

from __future__ import annotations

import torch

from ..codebooks import Codebook
from ..codebooks.packing import unpack_bits
from ..codebooks.quipsharp import E8PCodebook
from ..codebooks.scalar import ScalarGrid

MAX_DECODE_BATCH = 16  # decode batches; beyond this (prefill) a dequantize + matmul on tensor cores wins


def scalar_meta(codebook: ScalarGrid, buffers: dict[str, torch.Tensor], m: int, n: int) -> tuple[torch.Tensor, ...]:
    """(scale, zero), each (m, groups) float16 (exact: stored scales are fp16, zero-points integers or
    fp16), in the kernel's layout (per-row grids as one group)."""
    if codebook.scale_rule == "rms":
        scale = buffers["scales"].half().expand(m, 1)
        return scale.contiguous(), torch.full_like(scale, codebook.maxq / 2)
    groups = codebook.num_groups(n)
    scale = buffers["scales"].half()
    if codebook.scale_rule == "hqq":
        return scale, buffers["zeros"].half()
    zero = unpack_bits(buffers["zeros"].view(1, -1), codebook.bits, m * groups).view(m, groups).half()
    return scale, zero


def supports(codebook: Codebook) -> bool:
    return isinstance(codebook, (ScalarGrid, E8PCodebook))


def kernel_meta(codebook: Codebook, buffers: dict[str, torch.Tensor], m: int, n: int) -> tuple[torch.Tensor, ...]:
    """What the kernel needs besides the stored codes, computed once per module and device."""
    if isinstance(codebook, ScalarGrid):
        return scalar_meta(codebook, buffers, m, n)
    return ()


def quantized_matmul(codebook: Codebook, buffers: dict[str, torch.Tensor], meta: tuple[torch.Tensor, ...],
                     x: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """x (B, n) -> x · Ŵᵀ (B, m) through the codebook's kernel; `meta` from `kernel_meta`."""
    if isinstance(codebook, E8PCodebook):
        from .e8p_gemv import e8p_gemv

        stage2 = {2: 0, 3: 1, 4: 2}[codebook.bits]
        resid_inv = 1.0 / codebook.resid if codebook.resid else 0.0
        return e8p_gemv(x, buffers["codes"], buffers.get("codes2"), stage2, buffers["scales"], resid_inv)
    from .scalar_gemv import scalar_gemv

    group = codebook.group_len(n) if codebook.scale_rule != "rms" else n
    return scalar_gemv(x, buffers["codes"], meta[0], meta[1], codebook.bits, group)
