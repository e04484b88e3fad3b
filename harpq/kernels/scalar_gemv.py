"""y = x · Ŵᵀ for a packed b-bit scalar grid (RTN / GPTQ / HQQ / QuIP layouts), batch 1–8, one pass over W.

Codes are read straight from the int32 bit stream of `codebooks.packing` (every 32 codes are b words,
so a 3-bit code may straddle two words), dequantized in registers as scale · (q − zero) per group and
reduced against x; W is never materialised. Accumulation is float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _scalar_gemv(x_ptr, words_ptr, scale_ptr, zero_ptr, y_ptr, M, N, WORDS, GROUPS, GROUP, BATCH,
                 BITS: tl.constexpr, BP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    batch = tl.arange(0, BP)
    bmask = batch < BATCH
    acc = tl.zeros((BLOCK_M, BP), dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < N
        bitpos = (cols % 32) * BITS
        word = (cols // 32) * BITS + bitpos // 32
        off = (bitpos % 32).to(tl.uint32)
        spill = (bitpos % 32) + BITS > 32
        mask = rmask[:, None] & cmask[None, :]
        ptr = words_ptr + rows[:, None] * WORDS + word[None, :]
        lo = tl.load(ptr, mask=mask, other=0).to(tl.uint32, bitcast=True)
        hi = tl.load(ptr + 1, mask=mask & spill[None, :], other=0).to(tl.uint32, bitcast=True)
        up = tl.where(spill, 32 - off, 0).to(tl.uint32)
        code = ((lo >> off[None, :]) | tl.where(spill[None, :], hi << up[None, :], 0)) & ((1 << BITS) - 1)
        group = cols // GROUP
        meta = rows[:, None] * GROUPS + group[None, :]
        scale = tl.load(scale_ptr + meta, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + meta, mask=mask, other=0.0).to(tl.float32)
        w = (code.to(tl.float32) - zero) * scale
        x = tl.load(x_ptr + batch[:, None] * N + cols[None, :], mask=bmask[:, None] & cmask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(w[:, None, :] * x[None, :, :], axis=2)
    out = y_ptr + batch[None, :] * M + rows[:, None]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & bmask[None, :])


@torch.library.custom_op("harpq::scalar_gemv", mutates_args=())
def scalar_gemv(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                group: int) -> torch.Tensor:
    """x (B, n), words (m, b·⌈n/32⌉) int32, scale and zero (m, ⌈n/group⌉) -> (B, m) in x's dtype."""
    x = x.contiguous()
    batch, n = x.shape
    m = words.shape[0]
    y = torch.empty(batch, m, dtype=x.dtype, device=x.device)
    bp = max(1, triton.next_power_of_2(batch))
    block_m = 32 if bp <= 2 else 16
    grid = (triton.cdiv(m, block_m),)
    _scalar_gemv[grid](x, words.contiguous(), scale.contiguous(), zero.contiguous(), y, m, n, words.shape[1],
                       scale.shape[1], group, batch, BITS=bits, BP=bp, BLOCK_M=block_m, BLOCK_K=128)
    return y


@scalar_gemv.register_fake
def _(x, words, scale, zero, bits, group):
    return x.new_empty(x.shape[0], words.shape[0])
