"""y = x · Ŵᵀ for QuIP#'s E8P codes (2 bits) and its residual stages (3, 4 bits), batch 1–16.

Each 16-bit code is decoded in registers: bits 0–7 pick a row of the 256-entry absolute-value table,
bits 8–14 are the signs of coordinates 0–6, the sign of coordinate 7 makes the number of negative
coordinates match the entry's parity, and bit 15 picks the ±¼ shift. The second stage is the 1-bit
E8 table (3 bits, uint8 codes) or E8P again (4 bits), added with weight 1/resid.

Why it is shaped this way: decoding, not memory, bounds an E8P matvec on a GPU like the H200, where
integer operations issue at half the float rate. An entry is one int32 word (eight 3-bit nibbles 2|v_i|,
the parity in bit 3), read once per code from a 1 KB table (a handful of cache lines, so the scattered
read is cheap). A nibble becomes the float f = 2 + 2|v|/16 by one shift and one mask into 2.0's
mantissa (no conversion, no subtraction); a sign flips x's sign bit (the eighth sign from an xor-folded
parity); Σ σ|v|·x = 8·(Σ f·σx − 2·Σ σx), and the ±¼ shift is applied once per code against Σ x over its
8 columns. The 8 coordinates are unrolled over 2-D tiles (3-D tiles and reshapes cost layout shuffles),
the reduction over columns happens once, after the loop. Batch rows are a grid axis (the codes of a
layer stay in L2 between them).

Measured on the H200 (`benchmarks/results/decode_notes.md`): a variant reading four pre-signed coordinates
per table word from two 32 KB tables (about 8 instead of 12 instructions per weight) ran no faster, its
scattered reads over 64 KB taking what the arithmetic saved; this decode was kept as the simpler one.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..codebooks.e8p import _entry_parity
from ..codebooks.lattice import e8_one_bit_points, e8p_abs_table

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Few rows and wide column tiles (thousands of programs, many loads in flight) beside many-row tiles (each
# x value reused across more rows); autotuning picks per shape.
_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_C": 32}, num_warps=4)] if _INTERPRET else [
    triton.Config({"BLOCK_M": bm, "BLOCK_C": bc}, num_warps=w)
    for bm, bc, w in [(1, 256, 2), (2, 256, 4), (4, 256, 4), (4, 256, 8), (2, 128, 2), (4, 128, 4), (1, 512, 4),
                      (2, 512, 8), (8, 128, 4), (8, 256, 8), (8, 64, 4), (16, 64, 4), (16, 128, 8)]
]


@triton.jit
def _e8p_dot(code, x_ptr, cc, cmask, packed_ptr, mask):
    """Σ_j v_j·x_j per code of a [BM, BC] tile, through the 256-word table of |v| (`packed_table`).

    One read per code from a 1 KB table; the signs flip x's sign bit (the eighth from the parity rule),
    a magnitude nibble 2|v| becomes f = 2 + 2|v|/16 in 2.0's mantissa, the ±¼ shift comes once per code."""
    c = code.to(tl.int32) & 0xFFFF
    word = tl.load(packed_ptr + (c & 255), mask=mask, other=0)
    signs = (c >> 8) & 127
    parity = signs ^ (signs >> 4)  # xor-folding: bit 0 ends as the parity of the 7 sign bits
    parity ^= parity >> 2
    parity ^= parity >> 1
    sign_bits = signs | (((parity ^ (word >> 3)) & 1) << 7)
    acc = tl.zeros(code.shape, dtype=tl.float32)
    signed_sum = tl.zeros(code.shape, dtype=tl.float32)
    xsum = tl.zeros(cc.shape, dtype=tl.float32)
    for j in tl.static_range(8):
        x = tl.load(x_ptr + cc * 8 + j, mask=cmask, other=0.0).to(tl.float32)
        xsum += x
        if 4 * j <= 18:
            t = word << (18 - 4 * j)
        else:
            t = word >> (4 * j - 18)
        f = ((t & 0x1C0000) | 0x40000000).to(tl.float32, bitcast=True)
        flipped = (x[None, :].to(tl.int32, bitcast=True) ^ ((sign_bits << (31 - j)) & -2147483648)).to(
            tl.float32, bitcast=True)
        acc += f * flipped
        signed_sum += flipped
    shift = tl.where(((c >> 15) & 1) == 1, 0.25, -0.25)
    return 8.0 * (acc - 2.0 * signed_sum) + shift * xsum[None, :]


@triton.jit
def _e8p_gemv_kernel(x_ptr, codes_ptr, codes2_ptr, packed_ptr, table2_ptr, scale_ptr, y_ptr, M, NC, resid_inv,
                     STAGE2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    xb = x_ptr + tl.program_id(1) * NC * 8
    rmask = rows < M
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for c0 in range(0, NC, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cmask = cc < NC
        mask = rmask[:, None] & cmask[None, :]
        at = rows[:, None] * NC + cc[None, :]
        acc += _e8p_dot(tl.load(codes_ptr + at, mask=mask, other=0), xb, cc, cmask, packed_ptr, mask)
        if STAGE2 == 1:  # 1-bit E8: a plain 256 × 8 table (stored doubled)
            c2 = (tl.load(codes2_ptr + at, mask=mask, other=0).to(tl.int32) & 255) * 8
            for j in tl.static_range(8):
                x = tl.load(xb + cc * 8 + j, mask=cmask, other=0.0).to(tl.float32)
                acc += tl.load(table2_ptr + c2 + j, mask=mask, other=0.0) * x[None, :] * (resid_inv * 0.5)
        if STAGE2 == 2:
            acc += _e8p_dot(tl.load(codes2_ptr + at, mask=mask, other=0), xb, cc, cmask, packed_ptr,
                            mask) * resid_inv
    scale = tl.load(scale_ptr).to(tl.float32)  # read on the device: no host sync, safe under CUDA graphs
    out = tl.sum(acc, axis=1) * scale
    tl.store(y_ptr + tl.program_id(1) * M + rows, out.to(y_ptr.dtype.element_ty), mask=rmask)


_e8p_gemv = triton.autotune(configs=_CONFIGS, key=["M", "NC", "STAGE2"])(_e8p_gemv_kernel)

_TABLES: dict[torch.device, tuple[torch.Tensor, ...]] = {}


def packed_table() -> torch.Tensor:
    """(256,) int32: nibble i holds 2|v_i| (1, 3 or 5), bit 3 the entry's parity."""
    twice = (2 * e8p_abs_table()).round().to(torch.int64)
    word = (twice << (4 * torch.arange(8))).sum(1) | (_entry_parity(torch.device("cpu")).to(torch.int64) << 3)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def tables(device: torch.device) -> tuple[torch.Tensor, ...]:
    """(packed |v| table, doubled 1-bit E8 table) on the device, built once."""
    if device not in _TABLES:
        _TABLES[device] = (packed_table().to(device), (2 * e8_one_bit_points()).float().to(device))
    return _TABLES[device]


def _launch(x: torch.Tensor, codes: torch.Tensor, codes2: torch.Tensor | None, stage2: int, scale: torch.Tensor,
            resid_inv: float, config: dict[str, int] | None = None) -> torch.Tensor:
    """Run the kernel, autotuned, or with one fixed `config` (BLOCK_M, BLOCK_C, num_warps)."""
    x = x.contiguous()
    batch = x.shape[0]
    m, nc = codes.shape
    packed, table2 = tables(x.device)
    y = torch.empty(batch, m, dtype=x.dtype, device=x.device)
    args = (x, codes.contiguous(), codes2.contiguous() if codes2 is not None else codes, packed, table2, scale, y,
            m, nc, resid_inv)
    if config is None:
        _e8p_gemv[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), batch)](*args, STAGE2=stage2)
    else:
        _e8p_gemv_kernel[(triton.cdiv(m, config["BLOCK_M"]), batch)](*args, STAGE2=stage2, **config)
    return y


@torch.library.custom_op("harpq::e8p_gemv", mutates_args=())
def e8p_gemv(x: torch.Tensor, codes: torch.Tensor, codes2: torch.Tensor | None, stage2: int, scale: torch.Tensor,
             resid_inv: float) -> torch.Tensor:
    """x (B, n), codes (m, n/8) int16 [, codes2 (m, n/8)], scale (1, 1) -> (B, m) in x's dtype;
    stage2: 0 none, 1 E8, 2 E8P."""
    return _launch(x, codes, codes2, stage2, scale, resid_inv)


@e8p_gemv.register_fake
def _(x, codes, codes2, stage2, scale, resid_inv):
    return x.new_empty(x.shape[0], codes.shape[0])
