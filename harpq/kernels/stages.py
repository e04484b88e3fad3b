"""Online transforms (RHT and HARP sides) as a product of block stages, one Triton launch per stage.

Both processors' sides are Q = B_T ⋯ B_1 · diag(signs) (see `processors.butterfly.apply_stages`): the
RHT's H_K ⊗ H_{2^k} is a few Sylvester stages plus one dense H_K stage whose block is shared by every
position, HARP's stages have one learned block per position. `StagePlan` flattens a side's blocks into
one float32 buffer once per module; `stage_product` applies Q x (or Qᵀ x) with the signs fused into the
first (or last) stage. A stage reads each input b times (from L1) and writes each output once; each
program holds a [outputs, radix] tile so all of an output's loads are in flight together.

At decode sizes a stage is a small kernel of 1–4 µs, much of it launch floor (≈ 0.8 µs on an H200) and
latency, so two adjacent stages of small radix (HARP's radix-8 digits) run as one launch: a program
holds every value of both digits for a few positions of the others and applies the two block products
in registers. HARP's kron schedule then costs the RHT's launch count (two per side at 4096 and 11008).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..hadamard.construct import sylvester
from . import hadamard_cuda

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_PAIR_TILE = 4096  # largest [positions, outer, inner, radix] product tile of a fused pair
# Tile sizes (elements of a [outputs, radix] tile; of a pair's product tile) are autotuned per shape.
_STAGE_CONFIGS = [triton.Config({"TILE": 1024}, num_warps=4)] if _INTERPRET else [
    triton.Config({"TILE": t}, num_warps=w) for t in (512, 1024, 2048, 4096) for w in (2, 4, 8)]
_PAIR_CONFIGS = [triton.Config({"TILE": 4096}, num_warps=4)] if _INTERPRET else [
    triton.Config({"TILE": t}, num_warps=w) for t in (1024, 2048, 4096) for w in (2, 4, 8)]


def _stage_block(tile: int, rp2: int) -> int:
    return max(1, tile // rp2)


@triton.autotune(configs=_STAGE_CONFIGS, key=["N", "RADIX", "LO", "PER_POSITION", "TRANSPOSE"])
@triton.jit
def _stage(src_ptr, dst_ptr, signs_ptr, blocks_ptr, N, RADIX, LO, OFFSET, PER_POSITION: tl.constexpr,
           TRANSPOSE: tl.constexpr, SIGNS_IN: tl.constexpr, SIGNS_OUT: tl.constexpr, RP2: tl.constexpr,
           TILE: tl.constexpr):
    """BLOCK outputs × all RADIX inputs of each as one [BLOCK, RP2] tile: every load is issued at once."""
    BLOCK: tl.constexpr = TILE // RP2 if TILE > RP2 else 1
    row = tl.program_id(1)
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N
    low = idx % LO
    digit = (idx // LO) % RADIX
    high = idx // (LO * RADIX)
    c = tl.arange(0, RP2)
    tile_mask = mask[:, None] & (c < RADIX)[None, :]
    at = (high * RADIX * LO + low)[:, None] + c[None, :] * LO
    v = tl.load(src_ptr + row * N + at, mask=tile_mask, other=0.0).to(tl.float32)
    if SIGNS_IN:
        v *= tl.load(signs_ptr + at, mask=tile_mask, other=0.0)
    if PER_POSITION:
        first = OFFSET + (high * LO + low) * RADIX * RADIX
    else:
        first = OFFSET + tl.zeros_like(idx)
    if TRANSPOSE:
        k_at = first[:, None] + c[None, :] * RADIX + digit[:, None]
    else:
        k_at = first[:, None] + digit[:, None] * RADIX + c[None, :]
    acc = tl.sum(tl.load(blocks_ptr + k_at, mask=tile_mask, other=0.0) * v, axis=1)
    if SIGNS_OUT:
        acc *= tl.load(signs_ptr + idx, mask=mask, other=0.0)
    tl.store(dst_ptr + row * N + idx, acc.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _block_product(v, blocks_ptr, base, INNER: tl.constexpr, R: tl.constexpr, RP: tl.constexpr,
                   TRANSPOSE: tl.constexpr, mask):
    """One stage on a [Q, A, B] tile along its inner (B) or outer (A) digit: out_d = Σ_c K[d, c]·v_c.

    `base` holds each block's offset: [Q, A] for the inner digit, [Q, B] for the outer one."""
    d = tl.arange(0, RP)
    kd = (d[:, None] + d[None, :] * R) if TRANSPOSE else (d[:, None] * R + d[None, :])  # [d, c]
    km2 = (d < R)[:, None] & (d < R)[None, :]
    if INNER:  # K as [Q, A, d, c], v as [Q, A, 1, c]
        k = tl.load(blocks_ptr + base[:, :, None, None] + kd[None, None, :, :],
                    mask=mask[:, :, :, None] & km2[None, None, :, :], other=0.0)
        return tl.sum(k * v[:, :, None, :], axis=3)
    else:  # K as [Q, d, c, B], v as [Q, 1, c, B]
        k = tl.load(blocks_ptr + base[:, None, None, :] + kd[None, :, :, None],
                    mask=mask[:, :, None, :] & km2[None, :, :, None], other=0.0)
        return tl.sum(k * v[:, None, :, :], axis=2)


def _pair_positions(tile: int, r1p: int, r2p: int, positions: int) -> int:
    return min(max(1, tile // (r1p * r2p * max(r1p, r2p))), triton.next_power_of_2(positions))


@triton.autotune(configs=_PAIR_CONFIGS, key=["N", "LO", "R1", "R2", "PER1", "PER2", "TRANSPOSE"])
@triton.jit
def _stage_pair(src_ptr, dst_ptr, signs_ptr, blocks_ptr, N, LO, OFF1, OFF2, R1: tl.constexpr, R2: tl.constexpr,
                PER1: tl.constexpr, PER2: tl.constexpr, TRANSPOSE: tl.constexpr, SIGNS_IN: tl.constexpr,
                SIGNS_OUT: tl.constexpr, R1P: tl.constexpr, R2P: tl.constexpr, QMAX: tl.constexpr,
                TILE: tl.constexpr):
    """Stages t (inner digit, radix R1, stride LO) and t+1 (outer digit, radix R2, stride LO·R1) in one
    launch: inner then outer, or (TRANSPOSE) outer then inner with transposed blocks. A program holds a
    [Q positions, R2, R1] tile; position q stands for the other digits (hi, low)."""
    PAIR: tl.constexpr = R1P * R2P * (R1P if R1P > R2P else R2P)
    Q: tl.constexpr = QMAX if TILE // PAIR > QMAX else (TILE // PAIR if TILE > PAIR else 1)
    row = tl.program_id(1)
    q = tl.program_id(0) * Q + tl.arange(0, Q)
    hi = q // LO
    low = q % LO
    d2 = tl.arange(0, R2P)
    d1 = tl.arange(0, R1P)
    mask = (q < N // (R1 * R2))[:, None, None] & (d2 < R2)[None, :, None] & (d1 < R1)[None, None, :]
    at = (hi * R2 * R1 * LO + low)[:, None, None] + (d2 * R1 * LO)[None, :, None] + (d1 * LO)[None, None, :]
    v = tl.load(src_ptr + row * N + at, mask=mask, other=0.0).to(tl.float32)
    if SIGNS_IN:
        v *= tl.load(signs_ptr + at, mask=mask, other=0.0)
    # block offsets as in `_stage`: OFFSET + (high·LO' + low')·R², where high, low' are the other digits
    if PER1:  # inner digit: high = (hi, d2), low' = low
        base1 = OFF1 + ((hi * R2)[:, None] + d2[None, :]) * (LO * R1 * R1) + (low * R1 * R1)[:, None]
    else:
        base1 = OFF1 + tl.zeros((Q, R2P), dtype=tl.int32)
    if PER2:  # outer digit: high = hi, low' = (d1, low) at stride LO·R1
        base2 = OFF2 + ((hi * LO * R1 + low)[:, None] + (d1 * LO)[None, :]) * (R2 * R2)
    else:
        base2 = OFF2 + tl.zeros((Q, R1P), dtype=tl.int32)
    if TRANSPOSE:
        v = _block_product(v, blocks_ptr, base2, False, R2, R2P, True, mask)
        v = _block_product(v, blocks_ptr, base1, True, R1, R1P, True, mask)
    else:
        v = _block_product(v, blocks_ptr, base1, True, R1, R1P, False, mask)
        v = _block_product(v, blocks_ptr, base2, False, R2, R2P, False, mask)
    if SIGNS_OUT:
        v *= tl.load(signs_ptr + at, mask=mask, other=0.0)
    tl.store(dst_ptr + row * N + at, v.to(dst_ptr.dtype.element_ty), mask=mask)


@dataclass
class StagePlan:
    """A side's stages, flattened: `blocks` float32, and per stage (radix, stride, offset, per_position)."""

    n: int
    signs: torch.Tensor
    blocks: torch.Tensor
    table: list[int]
    #: every stage is the orthonormal Sylvester H_r shared by all positions, so the product is H_n / √n
    #: (the RHT at a power-of-two width): `hadamard_cuda` can run it in one launch
    sylvester: bool = False

    @classmethod
    def build(cls, signs: torch.Tensor, kernels: list[torch.Tensor], schedule: list[int]) -> StagePlan:
        n = signs.shape[0]
        flat, table, offset, stride = [], [], 0, 1
        for k, b in zip(kernels, schedule, strict=True):
            per = int(k.dim() == 3)
            flat.append(k.float().reshape(-1))
            table += [b, stride, offset, per]
            offset += k.numel()
            stride *= b
        sylvester = stride == n and all(  # the stages cover every digit: H_n, not a block-diagonal part
            k.dim() == 2 and torch.allclose(k.double().cpu(), _sylvester(b), rtol=0, atol=1e-12)
            for k, b in zip(kernels, schedule, strict=True))
        return cls(n, signs.float().contiguous(), torch.cat(flat).contiguous(), table, sylvester)


def _sylvester(r: int) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of order r (the one-launch kernel's), float64; zeros where r
    is not a power of two."""
    if r < 1 or r & (r - 1):
        return torch.zeros(r, r, dtype=torch.float64)
    return torch.from_numpy(sylvester(r)).double() / math.sqrt(r)


@torch.library.custom_op("harpq::stage_product", mutates_args=())
def stage_product(x: torch.Tensor, signs: torch.Tensor, blocks: torch.Tensor, table: list[int],
                  transpose: bool) -> torch.Tensor:
    """x (B, n) -> Q x (signs first) or Qᵀ x (signs last) along the last dim, in x's dtype."""
    x = x.contiguous()
    batch, n = x.shape
    launches = _launches([table[i:i + 4] for i in range(0, len(table), 4)], transpose)
    src = x
    for i, group in enumerate(launches):
        first, last = i == 0, i == len(launches) - 1
        dst = torch.empty(batch, n, dtype=x.dtype if last else torch.float32, device=x.device)
        signs_in, signs_out = first and not transpose, last and transpose
        if len(group) == 1:
            (b, lo, offset, per), = group
            rp2 = triton.next_power_of_2(b)
            _stage[lambda meta, rp2=rp2: (triton.cdiv(n, _stage_block(meta["TILE"], rp2)), batch)](
                src, dst, signs, blocks, n, b, lo, offset, PER_POSITION=bool(per), TRANSPOSE=transpose,
                SIGNS_IN=signs_in, SIGNS_OUT=signs_out, RP2=rp2)
        else:
            (b1, lo, off1, per1), (b2, _, off2, per2) = group
            r1p, r2p = triton.next_power_of_2(b1), triton.next_power_of_2(b2)
            positions = n // (b1 * b2)
            qmax = triton.next_power_of_2(positions)
            def pair_grid(meta, r1p=r1p, r2p=r2p, positions=positions):
                return triton.cdiv(positions, _pair_positions(meta["TILE"], r1p, r2p, positions)), batch

            _stage_pair[pair_grid](
                src, dst, signs, blocks, n, lo, off1, off2, R1=b1, R2=b2, PER1=bool(per1), PER2=bool(per2),
                TRANSPOSE=transpose, SIGNS_IN=signs_in, SIGNS_OUT=signs_out, R1P=r1p, R2P=r2p, QMAX=qmax)
        src = dst
    return src


def _pairs(b1: int, b2: int) -> bool:
    r1, r2 = triton.next_power_of_2(b1), triton.next_power_of_2(b2)
    return r1 * r2 * max(r1, r2) <= _PAIR_TILE


def _launches(stages: list[list[int]], transpose: bool) -> list[list[list[int]]]:
    """Stages in launch order, adjacent small-radix stages paired as (inner, outer)."""
    order = list(range(len(stages) - 1, -1, -1)) if transpose else list(range(len(stages)))
    launches, i = [], 0
    while i < len(order):
        t, u = order[i], order[i + 1] if i + 1 < len(order) else None
        inner, outer = (u, t) if transpose else (t, u)
        if u is not None and _pairs(stages[inner][0], stages[outer][0]):
            launches.append([stages[inner], stages[outer]])
            i += 2
        else:
            launches.append([stages[t]])
            i += 1
    return launches


@stage_product.register_fake
def _(x, signs, blocks, table, transpose):
    return torch.empty_like(x)


def apply_plan(plan: StagePlan, x: torch.Tensor, transpose: bool) -> torch.Tensor:
    """Q x or Qᵀ x over the last dim of x (any leading shape)."""
    rows = x.reshape(-1, plan.n)
    if plan.sylvester and hadamard_cuda.usable(rows):
        return hadamard_cuda.hadamard_rows(rows, plan.signs, transpose).view(x.shape)
    return stage_product(rows, plan.signs, plan.blocks, plan.table, transpose).view(x.shape)
