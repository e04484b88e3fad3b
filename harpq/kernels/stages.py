"""Online transforms (RHT and HARP sides) as a product of block stages, one Triton launch per stage.

Both processors' sides are Q = B_T ⋯ B_1 · diag(signs) (see `processors.butterfly.apply_stages`): the
RHT's H_K ⊗ H_{2^k} is a few Sylvester stages plus one dense H_K stage whose block is shared by every
position, HARP's stages have one learned block per position. `StagePlan` flattens a side's blocks into
one float32 buffer once per module; `stage_product` applies Q x (or Qᵀ x) with the signs fused into the
first (or last) stage. A stage reads each input b times (from L1) and writes each output once; each
program holds a [outputs, radix] tile so all of an output's loads are in flight together.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_TILE = 1024 if os.environ.get("TRITON_INTERPRET") == "1" else 2048  # elements of a [outputs, radix] tile


@triton.jit
def _stage(src_ptr, dst_ptr, signs_ptr, blocks_ptr, N, RADIX, LO, OFFSET, PER_POSITION: tl.constexpr,
           TRANSPOSE: tl.constexpr, SIGNS_IN: tl.constexpr, SIGNS_OUT: tl.constexpr, BLOCK: tl.constexpr,
           RP2: tl.constexpr):
    """BLOCK outputs × all RADIX inputs of each as one [BLOCK, RP2] tile: every load is issued at once."""
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


@dataclass
class StagePlan:
    """A side's stages, flattened: `blocks` float32, and per stage (radix, stride, offset, per_position)."""

    n: int
    signs: torch.Tensor
    blocks: torch.Tensor
    table: list[int]

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
        return cls(n, signs.float().contiguous(), torch.cat(flat).contiguous(), table)


@torch.library.custom_op("harpq::stage_product", mutates_args=())
def stage_product(x: torch.Tensor, signs: torch.Tensor, blocks: torch.Tensor, table: list[int],
                  transpose: bool) -> torch.Tensor:
    """x (B, n) -> Q x (signs first) or Qᵀ x (signs last) along the last dim, in x's dtype."""
    x = x.contiguous()
    batch, n = x.shape
    stages = [table[i:i + 4] for i in range(0, len(table), 4)]
    order = list(reversed(stages)) if transpose else stages
    src = x
    for i, (b, lo, offset, per) in enumerate(order):
        last = i == len(order) - 1
        dst = torch.empty(batch, n, dtype=x.dtype if last else torch.float32, device=x.device)
        rp2 = triton.next_power_of_2(b)
        block = max(1, _TILE // rp2)
        _stage[(triton.cdiv(n, block), batch)](
            src, dst, signs, blocks, n, b, lo, offset, PER_POSITION=bool(per), TRANSPOSE=transpose,
            SIGNS_IN=(i == 0 and not transpose), SIGNS_OUT=(last and transpose), BLOCK=block, RP2=rp2)
        src = dst
    return src


@stage_product.register_fake
def _(x, signs, blocks, table, transpose):
    return torch.empty_like(x)


def apply_plan(plan: StagePlan, x: torch.Tensor, transpose: bool) -> torch.Tensor:
    """Q x or Qᵀ x over the last dim of x (any leading shape)."""
    rows = x.reshape(-1, plan.n)
    return stage_product(rows, plan.signs, plan.blocks, plan.table, transpose).view(x.shape)
