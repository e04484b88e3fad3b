"""A decoder layer whose linears have Hadamard sides (`rht`, `rht-block`) or HARP's runs of learned stages
(`harp` with the `block` schedule), run with the sides inside the step's own kernels (`kernels.block_sides`).

Unfused, each quantized linear applies its input and output side as launches of their own (two per
side with the stage kernels). Here the layer's launches are the fp16 path's, with the sides folded in:
the RMSNorms also apply the shared input side of q/k/v and of gate/up, the RoPE kernel the output sides
of q/k/v, the SiLU·up kernel the output sides of gate/up and the input side of down; o's input side
and the output sides of o and down (each with the residual add) keep a launch: three transform launches
per layer where every side fuses (four where down's input side spans more than 64 runs, as the full RHT
of Llama-2-7B's 11,008-wide MLP, H_172 ⊗ H_64: then it is a launch of its own). A side the kernels cannot
hold (over 256 runs, blocks under 16) runs as before, through its module. Where the storage
format can stack matrices (E8P with a scale per row, the scalar group formats), q/k/v and gate/up are one
GEMV each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import QuantLinear
from ..nn.quant_linear import view_stacked

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


class StackedMatrix:
    """The stored matrices of linears that read one input, stacked along rows: one GEMV for the group (the
    fused kernels apply each member's sides). The members' codes become views of the stacked ones."""

    def __init__(self, mods: list[QuantLinear], buffers: dict[str, torch.Tensor]):
        self.format, self.n = mods[0].format, mods[0].in_features
        self.sizes = [m.out_features for m in mods]
        self.m = sum(self.sizes)
        self.mods = mods
        self.use_kernels = mods[0].use_kernels
        self._set(buffers)

    def _set(self, buffers: dict[str, torch.Tensor]) -> None:
        self.buffers = buffers
        self._prepared: dict[tuple, tuple] = {}
        view_stacked(self.mods, buffers)

    def apply_(self, fn) -> None:
        """Follow the members across a `Module._apply` (`.to()`, `.cuda()`, ...): the stacked tensors go
        through `fn` and the members become views of them again."""
        self._set({name: fn(t) for name, t in self.buffers.items()})

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


@dataclass
class LayerSides:
    """The modules of one layer, with the parts of the step that fuse their sides (the rest applies them
    through the modules, as unfused). Sides are read at each call (cached per module), so that they follow
    the modules across devices."""

    mods: dict[str, QuantLinear]
    qkv: StackedMatrix | None = None  # q/k/v's matrices as one GEMV, where their format can stack them
    gate_up: StackedMatrix | None = None

    @classmethod
    def build(cls, linears: dict[str, nn.Module], head_dim: int) -> LayerSides | None:
        """A plan where every linear is a bias-free QuantLinear, q/k/v and gate/up share their input side, and
        at least one side has a form the fused kernels take; else None (the layer runs unfused)."""
        names = ATTN + MLP
        if any(type(linears.get(n)) is not QuantLinear or linears[n].bias is not None for n in names):
            return None
        mods = {n: linears[n] for n in names}
        if not all(mods["q_proj"].shares_input_side(mods[n]) for n in ("k_proj", "v_proj")) \
                or not mods["gate_proj"].shares_input_side(mods["up_proj"]):
            return None
        device = mods["q_proj"].codes_device()
        if all(side is None for m in mods.values() for side in m.kernel_sides(device)):
            return None
        return cls(mods, StackedMatrix.build([mods[n] for n in ATTN[:3]]),
                   StackedMatrix.build([mods["gate_proj"], mods["up_proj"]]))

    def apply_(self, fn) -> None:
        for stack in (self.qkv, self.gate_up):
            if stack is not None:
                stack.apply_(fn)

    def _group(self, stack: StackedMatrix | None, names: tuple[str, ...], rows: torch.Tensor) -> list[torch.Tensor]:
        if stack is not None:
            return stack.matmul(rows)
        return [self.mods[n].matmul_rotated(rows) for n in names]

    def forward(self, blk, x: torch.Tensor, pos, cos, sin, mask) -> torch.Tensor:
        """Block.forward for this layer (fp16 activations, no q/k norms, no experts)."""
        from ..kernels import block_sides as ks
        from ..kernels.fused import rms_norm, rope_into_cache, silu_mul

        s, (b, t, dim) = blk.shape, x.shape
        m = self.mods
        outs, ins = {}, {}
        for n, mod in m.items():
            outs[n], ins[n] = mod.kernel_sides(x.device)

        def norm_in(x: torch.Tensor, weight: torch.Tensor, first: str) -> torch.Tensor:
            if ins[first] is not None:
                return ks.norm_rotate(x, weight, s.norm_eps, ins[first]).view(-1, dim)
            return m[first].rotate_input(rms_norm(x, weight, s.norm_eps, True).view(-1, dim))

        def rotate_in(rows: torch.Tensor, name: str) -> torch.Tensor:
            side = ins[name]
            return m[name].rotate_input(rows) if side is None else ks.rotate(rows, side, input_side=True)

        def rotate_out(z: torch.Tensor, name: str, residual: torch.Tensor | None = None) -> torch.Tensor:
            side = outs[name]
            if side is not None:
                return ks.rotate(z, side, input_side=False, residual=residual)
            y = m[name].rotate_output(z)
            return y if residual is None else residual + y

        h = norm_in(x, blk.attn_norm, "q_proj")
        zq, zk, zv = self._group(self.qkv, ATTN[:3], h)
        if ks.rope_sides_fuse(tuple(outs[n] for n in ATTN[:3]), s.hd):
            q = ks.rope_into_cache_rotated(zq.view(b, t, -1), zk.view(b, t, -1), zv.view(b, t, -1),
                                           tuple(outs[n] for n in ATTN[:3]), cos, sin, pos, blk.k_cache, blk.v_cache)
        else:
            q, k, v = (rotate_out(z, n).view(b, t, -1) for z, n in zip((zq, zk, zv), ATTN[:3], strict=True))
            q = rope_into_cache(q, k, v, cos, sin, pos, blk.k_cache, blk.v_cache)
        o = F.scaled_dot_product_attention(q, blk.k_cache, blk.v_cache, attn_mask=mask,
                                           enable_gqa=s.heads != s.kv_heads)
        o = rotate_in(o.transpose(1, 2).reshape(b * t, s.heads * s.hd), "o_proj")
        x = rotate_out(m["o_proj"].matmul_rotated(o), "o_proj", residual=x.view(-1, dim))
        h = norm_in(x, blk.mlp_norm, "gate_proj")
        zg, zu = self._group(self.gate_up, MLP[:2], h)
        how = ks.mlp_sides_fuse(outs["gate_proj"], outs["up_proj"], ins["down_proj"])
        if how == "all":
            a = ks.silu_mul_rotate(zg, zu, outs["gate_proj"], outs["up_proj"], ins["down_proj"])
        elif how == "outputs":
            a = rotate_in(ks.silu_mul_rotate(zg, zu, outs["gate_proj"], outs["up_proj"], None), "down_proj")
        else:
            a = rotate_in(silu_mul(rotate_out(zg, "gate_proj"), rotate_out(zu, "up_proj"), True), "down_proj")
        x = rotate_out(m["down_proj"].matmul_rotated(a), "down_proj", residual=x)
        return x.view(b, t, dim)
