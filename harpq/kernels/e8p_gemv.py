"""y = x · Ŵᵀ for QuIP#'s E8P codes (2 bits) and its residual stages (3, 4 bits), batch 1–8.

Each 16-bit code is decoded in registers: bits 0–7 pick a row of the 256 × 8 absolute-value table,
bits 8–14 are the signs of coordinates 0–6, the sign of coordinate 7 makes the number of negative
coordinates match the entry's parity (Σ 2|s_i|/2 mod 2), and bit 15 picks the ±¼ shift. The second
stage is the 1-bit E8 table (3 bits, uint8 codes) or E8P again (4 bits), added with weight 1/resid.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..codebooks.e8p import _entry_parity
from ..codebooks.lattice import e8_one_bit_points, e8p_abs_table


@triton.jit
def _e8p_decode(code, j, table_ptr, parity_ptr, mask):
    c = code.to(tl.int32) & 0xFFFF
    entry = c & 255
    mag = tl.load(table_ptr + entry * 8 + j, mask=mask, other=0.0)
    signs = (c >> 8) & 127
    count = tl.zeros_like(signs)
    for k in tl.static_range(7):
        count += (signs >> k) & 1
    last_negative = ((count + tl.load(parity_ptr + entry, mask=mask, other=0)) & 1) == 1
    negative = tl.where(j < 7, ((c >> (8 + j)) & 1) == 1, last_negative)
    shift = tl.where(((c >> 15) & 1) == 1, 0.25, -0.25)
    return tl.where(negative, -mag, mag) + shift


@triton.jit
def _e8p_gemv(x_ptr, codes_ptr, codes2_ptr, table_ptr, parity_ptr, table2_ptr, scale_ptr, y_ptr, M, N, BATCH,
              resid_inv, STAGE2: tl.constexpr, BP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    batch = tl.arange(0, BP)
    bmask = batch < BATCH
    acc = tl.zeros((BLOCK_M, BP), dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < N
        mask = rmask[:, None] & cmask[None, :]
        j = (cols % 8)[None, :]
        at = rows[:, None] * (N // 8) + (cols // 8)[None, :]
        w = _e8p_decode(tl.load(codes_ptr + at, mask=mask, other=0), j, table_ptr, parity_ptr, mask)
        if STAGE2 == 1:  # 1-bit E8: a plain 256 × 8 table
            c2 = tl.load(codes2_ptr + at, mask=mask, other=0).to(tl.int32) & 255
            w += tl.load(table2_ptr + c2 * 8 + j, mask=mask, other=0.0) * resid_inv
        if STAGE2 == 2:
            w += _e8p_decode(tl.load(codes2_ptr + at, mask=mask, other=0), j, table_ptr, parity_ptr, mask) * resid_inv
        x = tl.load(x_ptr + batch[:, None] * N + cols[None, :], mask=bmask[:, None] & cmask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(w[:, None, :] * x[None, :, :], axis=2)
    out = y_ptr + batch[None, :] * M + rows[:, None]
    scale = tl.load(scale_ptr).to(tl.float32)  # read on the device: no host sync, safe under CUDA graphs
    tl.store(out, (acc * scale).to(y_ptr.dtype.element_ty), mask=rmask[:, None] & bmask[None, :])


_TABLES: dict[torch.device, tuple[torch.Tensor, ...]] = {}


def tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(abs table, entry parity, 1-bit E8 table) on the device, built once."""
    if device not in _TABLES:
        _TABLES[device] = (e8p_abs_table().float().to(device), _entry_parity(device).to(torch.int32),
                           e8_one_bit_points().float().to(device))
    return _TABLES[device]


@torch.library.custom_op("harpq::e8p_gemv", mutates_args=())
def e8p_gemv(x: torch.Tensor, codes: torch.Tensor, codes2: torch.Tensor | None, stage2: int, scale: torch.Tensor,
             resid_inv: float) -> torch.Tensor:
    """x (B, n), codes (m, n/8) int16 [, codes2 (m, n/8)], scale (1, 1) -> (B, m) in x's dtype;
    stage2: 0 none, 1 E8, 2 E8P."""
    x = x.contiguous()
    batch, n = x.shape
    m = codes.shape[0]
    table, parity, table2 = tables(x.device)
    y = torch.empty(batch, m, dtype=x.dtype, device=x.device)
    bp = max(1, triton.next_power_of_2(batch))
    block_m = 32 if bp <= 2 else 16
    second = codes2.contiguous() if codes2 is not None else codes
    _e8p_gemv[(triton.cdiv(m, block_m),)](x, codes.contiguous(), second, table, parity, table2, scale, y, m, n,
                                          batch, resid_inv, STAGE2=stage2, BP=bp, BLOCK_M=block_m, BLOCK_K=128)
    return y


@e8p_gemv.register_fake
def _(x, codes, codes2, stage2, scale, resid_inv):
    return x.new_empty(x.shape[0], codes.shape[0])
