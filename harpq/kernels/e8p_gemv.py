"""y = x · Ŵᵀ for QuIP#'s E8P codes (2 bits) and its residual stages (3, 4 bits), batch 1–16.

Each 16-bit code is decoded in registers: bits 0–7 pick a row of the 256-entry absolute-value table,
bits 8–14 are the signs of coordinates 0–6, the sign of coordinate 7 makes the number of negative
coordinates match the entry's parity, and bit 15 picks the ±¼ shift. The second stage is the 1-bit
E8 table (3 bits, uint8 codes) or E8P again (4 bits), added with weight 1/resid.

Why it is shaped this way: decoding, not memory, bounds an E8P matvec, so every weight costs few
integer operations. An entry is one int32 word (eight 3-bit nibbles 2|v_i|, the parity in bit 3),
the magnitude becomes a float by an exponent trick instead of a conversion, a sign flips x's sign
bit (the eighth sign from an xor-folded parity), and the ±¼ shift is applied once per code against Σ x
over its 8 columns. Values are computed doubled (integers) and halved once at the end. The 8
coordinates are unrolled over 2-D tiles (3-D tiles and reshapes cost layout shuffles), the reduction
over columns happens once, after the loop.
Batch rows are a grid axis (the codes of a layer stay in L2 between them).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..codebooks.e8p import _entry_parity
from ..codebooks.lattice import e8_one_bit_points, e8p_abs_table

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Few rows per program and wide column tiles give thousands of programs: a GEMV at batch 1 is bound by how
# many loads are in flight, and a program that owns many rows walks its columns in a few serial steps.
_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_C": 32}, num_warps=4)] if _INTERPRET else [
    triton.Config({"BLOCK_M": bm, "BLOCK_C": bc}, num_warps=w)
    for bm, bc, w in [(1, 256, 2), (2, 256, 4), (4, 256, 4), (4, 256, 8), (2, 128, 2), (4, 128, 4), (1, 512, 4),
                      (2, 512, 8), (8, 128, 4), (8, 256, 8), (8, 64, 4), (16, 64, 4), (16, 128, 8)]
]


@triton.jit
def _float_of_small_int(q):
    """Exact float of an int in [0, 2^23) without a conversion instruction: 2^23 + q, minus 2^23."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _e8p_dot(code, x_ptr, cc, cmask, packed_ptr, mask):
    """Σ_j 2·decode(code)_j · x_j for a [BM, BC] tile of codes (columns 8·cc + j of x), as [BM, BC].

    Coordinates are unrolled (8 two-dimensional passes): no 3-D tiles, no reshapes."""
    c = code.to(tl.int32) & 0xFFFF
    word = tl.load(packed_ptr + (c & 255), mask=mask, other=0)
    signs = (c >> 8) & 127
    parity = signs ^ (signs >> 4)  # xor-folding: bit 0 ends as the parity of the 7 sign bits
    parity ^= parity >> 2
    parity ^= parity >> 1
    sign_bits = signs | (((parity ^ (word >> 3)) & 1) << 7)
    acc = tl.zeros(code.shape, dtype=tl.float32)
    xsum = tl.zeros(cc.shape, dtype=tl.float32)
    for j in tl.static_range(8):
        x = tl.load(x_ptr + cc * 8 + j, mask=cmask, other=0.0).to(tl.float32)
        xsum += x
        mag = _float_of_small_int((word >> (4 * j)) & 7)
        flip = (sign_bits << (31 - j)) & -2147483648  # sign j moved to bit 31
        acc += mag * (x[None, :].to(tl.int32, bitcast=True) ^ flip).to(tl.float32, bitcast=True)
    shift = tl.where(((c >> 15) & 1) == 1, 0.5, -0.5)
    return acc + shift * xsum[None, :]


@triton.autotune(configs=_CONFIGS, key=["M", "NC", "STAGE2"])
@triton.jit
def _e8p_gemv(x_ptr, codes_ptr, codes2_ptr, packed_ptr, table2_ptr, scale_ptr, y_ptr, M, NC, resid_inv,
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
        part = _e8p_dot(tl.load(codes_ptr + at, mask=mask, other=0), xb, cc, cmask, packed_ptr, mask)
        if STAGE2 == 1:  # 1-bit E8: a plain 256 × 8 table (stored doubled)
            c2 = (tl.load(codes2_ptr + at, mask=mask, other=0).to(tl.int32) & 255) * 8
            for j in tl.static_range(8):
                x = tl.load(xb + cc * 8 + j, mask=cmask, other=0.0).to(tl.float32)
                part += tl.load(table2_ptr + c2 + j, mask=mask, other=0.0) * x[None, :] * resid_inv
        if STAGE2 == 2:
            part += _e8p_dot(tl.load(codes2_ptr + at, mask=mask, other=0), xb, cc, cmask, packed_ptr,
                             mask) * resid_inv
        acc += part
    scale = tl.load(scale_ptr).to(tl.float32) * 0.5  # read on the device: no host sync, safe under CUDA graphs
    out = tl.sum(acc, axis=1) * scale
    tl.store(y_ptr + tl.program_id(1) * M + rows, out.to(y_ptr.dtype.element_ty), mask=rmask)


_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def packed_table() -> torch.Tensor:
    """(256,) int32: nibble i holds 2|v_i| (1, 3 or 5), bit 3 the entry's parity."""
    twice = (2 * e8p_abs_table()).round().to(torch.int64)
    word = (twice << (4 * torch.arange(8))).sum(1) | (_entry_parity(torch.device("cpu")).to(torch.int64) << 3)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed E8P entries, doubled 1-bit E8 table) on the device, built once."""
    if device not in _TABLES:
        _TABLES[device] = (packed_table().to(device), (2 * e8_one_bit_points()).float().to(device))
    return _TABLES[device]


@torch.library.custom_op("harpq::e8p_gemv", mutates_args=())
def e8p_gemv(x: torch.Tensor, codes: torch.Tensor, codes2: torch.Tensor | None, stage2: int, scale: torch.Tensor,
             resid_inv: float) -> torch.Tensor:
    """x (B, n), codes (m, n/8) int16 [, codes2 (m, n/8)], scale (1, 1) -> (B, m) in x's dtype;
    stage2: 0 none, 1 E8, 2 E8P."""
    x = x.contiguous()
    batch = x.shape[0]
    m, nc = codes.shape
    packed, table2 = tables(x.device)
    y = torch.empty(batch, m, dtype=x.dtype, device=x.device)
    second = codes2.contiguous() if codes2 is not None else codes

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), batch)

    _e8p_gemv[grid](x, codes.contiguous(), second, packed, table2, scale, y, m, nc, resid_inv, STAGE2=stage2)
    return y


@e8p_gemv.register_fake
def _(x, codes, codes2, stage2, scale, resid_inv):
    return x.new_empty(x.shape[0], codes.shape[0])
