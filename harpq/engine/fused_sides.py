"""A decoder layer whose seven linears have block-Hadamard sides (`rht-block`), run with every side inside
the step's own kernels (`kernels.block_sides`).

Unfused, each quantized linear applies its input and output side as launches of their own (two per
side with the stage kernels). Here the layer's launches are the fp16 path's, with the sides folded in:
the RMSNorms also apply the shared input side of q/k/v and of gate/up, the RoPE kernel the output sides
of q/k/v, the SiLU·up kernel the output sides of gate/up and the input side of down; only o's input
side and the output sides of o and down (each with the residual add) keep a launch: three transform
launches per layer. Where the storage format can stack matrices (E8P with a scale per row, the scalar
group formats), q/k/v and gate/up are one GEMV each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import QuantLinear

if TYPE_CHECKING:
    from ..kernels.block_sides import BlockSide

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


class StackedMatrix:
    """The stored matrices of linears that read one input, stacked along rows: one GEMV for the group (the
    fused kernels apply each member's sides). The members' codes become views of the stacked ones."""

    def __init__(self, mods: list[QuantLinear], buffers: dict[str, torch.Tensor]):
        self.format, self.n = mods[0].format, mods[0].in_features
        self.sizes = [m.out_features for m in mods]
        self.m = sum(self.sizes)
        self.buffers = buffers
        self.use_kernels = mods[0].use_kernels
        self._prepared: dict[tuple, tuple] = {}
        start = 0
        for mod in mods:
            for name, t in buffers.items():
                if getattr(mod, name).shape[0] == mod.out_features:  # row-wise tensors (codes), not scales
                    setattr(mod, name, t[start:start + mod.out_features])
            start += mod.out_features

    @classmethod
    def build(cls, mods: list[QuantLinear]) -> StackedMatrix | None:
        first = mods[0]
        if any(m.format.config() != first.format.config() or m.in_features != first.in_features for m in mods):
            return None
        buffers = first.format.concat_rows([(m._buffers_of(m._codebook_names), m.out_features) for m in mods],
                                           first.in_features)
        return None if buffers is None else cls(mods, buffers)

    def matmul(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """[Ŵ̃_i · rows for each member], views of one GEMV's output."""
        from .. import kernels

        backend = kernels.select(self.format, rows, self.m, self.n, fast=self.use_kernels is not False)
        key = (rows.device, backend.name)
        if key not in self._prepared:
            self._prepared[key] = backend.prepare(self.format, self.buffers, self.m, self.n)
        z = backend.matmul(self.format, self.buffers, self._prepared[key], rows, self.m, self.n)
        return list(z.split(self.sizes, dim=-1))


def _same(a: BlockSide, b: BlockSide) -> bool:
    return a.block == b.block and torch.equal(a.signs, b.signs)


@dataclass
class LayerSides:
    """The modules of one layer, whose block sides the fused kernels apply (read at each call, so that they
    follow the modules across devices)."""

    mods: dict[str, QuantLinear]
    qkv: StackedMatrix | None = None  # q/k/v's matrices as one GEMV, where their format can stack them
    gate_up: StackedMatrix | None = None

    @classmethod
    def build(cls, linears: dict[str, nn.Module], head_dim: int) -> LayerSides | None:
        """The plan where every linear is a bias-free QuantLinear with block sides that the kernels take
        (blocks ≥ 16; q/k/v and gate/up sharing one input side; q/k/v's output blocks equal and gate/up's
        equal to down's input block; a power-of-two head size); else None (the layer runs unfused)."""
        from ..kernels.block_sides import MIN_BLOCK

        names = ATTN + MLP
        if any(type(linears.get(n)) is not QuantLinear or linears[n].bias is not None for n in names):
            return None
        sides = {n: linears[n].block_sides() for n in names}
        if any(s is None for s in sides.values()) or head_dim & (head_dim - 1):
            return None
        outs = {n: s[0] for n, s in sides.items()}
        ins = {n: s[1] for n, s in sides.items()}
        if min(s.block for pair in sides.values() for s in pair) < MIN_BLOCK:
            return None
        if not all(_same(ins["q_proj"], ins[n]) for n in ("k_proj", "v_proj")) \
                or not _same(ins["gate_proj"], ins["up_proj"]):
            return None
        if len({outs[n].block for n in ATTN[:3]}) > 1 \
                or len({outs["gate_proj"].block, outs["up_proj"].block, ins["down_proj"].block}) > 1:
            return None
        mods = {n: linears[n] for n in names}
        return cls(mods, StackedMatrix.build([mods[n] for n in ATTN[:3]]),
                   StackedMatrix.build([mods["gate_proj"], mods["up_proj"]]))

    def _group(self, stack: StackedMatrix | None, names: tuple[str, ...], rows: torch.Tensor) -> list[torch.Tensor]:
        if stack is not None:
            return stack.matmul(rows)
        return [self.mods[n].matmul_rotated(rows) for n in names]

    def forward(self, blk, x: torch.Tensor, pos, cos, sin, mask) -> torch.Tensor:
        """Block.forward for this layer (fp16 activations, no q/k norms, no experts)."""
        from ..kernels.block_sides import norm_rotate, rope_into_cache_rotated, rotate, silu_mul_rotate

        s, (b, t, dim) = blk.shape, x.shape
        m = self.mods
        outs, ins = {}, {}
        for n, mod in m.items():
            outs[n], ins[n] = mod.block_sides()
        h = norm_rotate(x, blk.attn_norm, s.norm_eps, ins["q_proj"]).view(-1, dim)
        q, k, v = (z.view(b, t, -1) for z in self._group(self.qkv, ATTN[:3], h))
        q = rope_into_cache_rotated(q, k, v, tuple(outs[n] for n in ATTN[:3]), cos, sin, pos,
                                    blk.k_cache, blk.v_cache)
        o = F.scaled_dot_product_attention(q, blk.k_cache, blk.v_cache, attn_mask=mask,
                                           enable_gqa=s.heads != s.kv_heads)
        o = rotate(o.transpose(1, 2).reshape(b * t, s.heads * s.hd), ins["o_proj"], input_side=True)
        x = rotate(m["o_proj"].matmul_rotated(o), outs["o_proj"], input_side=False, residual=x.view(-1, dim))
        h = norm_rotate(x, blk.mlp_norm, s.norm_eps, ins["gate_proj"])
        a = silu_mul_rotate(*self._group(self.gate_up, MLP[:2], h), outs["gate_proj"], outs["up_proj"],
                            ins["down_proj"])
        x = rotate(m["down_proj"].matmul_rotated(a), outs["down_proj"], input_side=False, residual=x)
        return x.view(b, t, dim)
