"""y = x · Ŵᵀ for a packed b-bit scalar grid (RTN / GPTQ / HQQ / QuIP layouts), batch 1–16, one pass over W.

Codes are read straight from the int32 bit stream of `codebooks.packing`; W is never materialised and
accumulation is float32. Two kernels:

- `_grouped_gemv`, for widths that divide 32 (1, 2, 4, 8 bits) and whole groups of a multiple of 32
  columns: whole words are loaded once and split in registers slot by slot (2-D tiles only), and per
  word the sum is s·(Σ q·x − z·Σ x), so zero-point and scale cost one operation per word, not per weight.
  A code becomes the float 2 + q/2^(b−1) by a shift and a mask into 2.0's mantissa (no conversion, no
  subtraction per weight: the constant comes out against Σ x once per word).
- `_bitstream_gemv`, for everything else (3 bits, where a code may straddle two words; ragged groups;
  one grid per row): per column, correct but slower.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_G": 2}, num_warps=4)] if _INTERPRET else [
    triton.Config({"BLOCK_M": bm, "BLOCK_G": bg}, num_warps=w)  # few rows, wide tiles: see e8p_gemv
    for bm, bg, w in [(1, 8, 2), (2, 8, 4), (4, 4, 4), (4, 8, 4), (2, 16, 4), (4, 16, 8), (8, 4, 4), (8, 8, 4),
                      (16, 4, 4), (16, 2, 4), (32, 2, 4), (64, 1, 8)]
]


@triton.jit
def _code_as_float(words, at: tl.constexpr, BITS: tl.constexpr):
    """The BITS-bit code at bit `at` of each word as the float 2 + q/2^(BITS−1), without a conversion:
    the code is moved to the top of 2.0's mantissa (bits 23−BITS … 22) by one shift and one mask."""
    TOP: tl.constexpr = 23 - BITS
    if at <= TOP:
        t = words << (TOP - at)
    else:
        t = words >> (at - TOP)
    return ((t & (((1 << BITS) - 1) << TOP)) | 0x40000000).to(tl.float32, bitcast=True)


def grouped_ok(bits: int, group: int, n: int) -> bool:
    """Whether the fast whole-word kernel handles this layout."""
    return 32 % bits == 0 and group % 32 == 0 and n % group == 0


@triton.autotune(configs=_CONFIGS, key=["M", "GROUPS", "BITS", "GROUP"])
@triton.jit
def _grouped_gemv(x_ptr, words_ptr, scale_ptr, zero_ptr, y_ptr, M, N, WORDS, GROUPS,
                  BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
    PER: tl.constexpr = 32 // BITS  # codes per word, lowest bits first
    GW: tl.constexpr = GROUP // PER  # words per group
    BW: tl.constexpr = BLOCK_G * GW  # words per tile
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    xb = x_ptr + tl.program_id(1) * N
    rmask = rows < M
    acc = tl.zeros((BLOCK_M, BW), dtype=tl.float32)
    for w0 in range(0, WORDS, BW):
        wi = w0 + tl.arange(0, BW)
        wmask = wi < WORDS
        mask = rmask[:, None] & wmask[None, :]
        words = tl.load(words_ptr + rows[:, None] * WORDS + wi[None, :], mask=mask, other=0)
        fx = tl.zeros((BLOCK_M, BW), dtype=tl.float32)
        xsum = tl.zeros((BW,), dtype=tl.float32)
        for s in tl.static_range(PER):  # slot s of every word: column PER·w + s
            x = tl.load(xb + wi * PER + s, mask=wmask, other=0.0).to(tl.float32)
            xsum += x
            fx += _code_as_float(words, s * BITS, BITS) * x[None, :]
        meta = rows[:, None] * GROUPS + (wi // GW)[None, :]
        scale = tl.load(scale_ptr + meta, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + meta, mask=mask, other=0.0).to(tl.float32)
        # Σ q·x = D·(Σ f·x − 2·Σ x) with D = 2^(BITS−1), so Σ (q − z)·x = D·Σ f·x − (2D + z)·Σ x
        acc += scale * (fx * (1 << (BITS - 1)) - (zero + (2 << (BITS - 1))) * xsum[None, :])
    out = tl.sum(acc, axis=1)
    tl.store(y_ptr + tl.program_id(1) * M + rows, out.to(y_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _bitstream_gemv(x_ptr, words_ptr, scale_ptr, zero_ptr, y_ptr, M, N, WORDS, GROUPS, GROUP, BATCH,
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
    if grouped_ok(bits, group, n):
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]), batch)

        _grouped_gemv[grid](x, words.contiguous(), scale.contiguous(), zero.contiguous(), y, m, n, words.shape[1],
                            scale.shape[1], BITS=bits, GROUP=group)
        return y
    bp = max(1, triton.next_power_of_2(batch))
    block_m = 32 if bp <= 2 else 16
    grid = (triton.cdiv(m, block_m),)
    _bitstream_gemv[grid](x, words.contiguous(), scale.contiguous(), zero.contiguous(), y, m, n, words.shape[1],
                       scale.shape[1], group, batch, BITS=bits, BP=bp, BLOCK_M=block_m, BLOCK_K=128)
    return y


@scalar_gemv.register_fake
def _(x, words, scale, zero, bits, group):
    return x.new_empty(x.shape[0], words.shape[0])
