"""Block-Hadamard sides fused into the decode step's own kernels.

An `rht-block` side is Q = (I ⊗ H_b)·diag(s): signs, then the Sylvester Hadamard on each run of b
entries. Applied as launches of their own, the sides of a decoder layer's seven linears cost a dozen
launches per token and layer; but each side only mixes runs of b entries, so the kernels that produce a
linear's input or consume its output can apply it to the tile they hold anyway:

- q/k/v's and gate/up's shared input side: in the RMSNorm that makes their input (`norm_rotate`);
- q/k/v's output sides: in the RoPE + cache-write kernel (`rope_into_cache_rotated`);
- gate/up's output sides and down's input side: in the SiLU·up kernel (`silu_mul_rotate`);
- o's input side, and o's and down's output sides with the residual add: one launch each (`rotate`).

A tile of runs times H_b is one `tl.dot` ([16 runs, b] · [b, b], fp16 in, fp32 out: the ±1 entries make
every product exact), then 1/√b in fp32. Rounding follows the unfused path: an output side's result is
rounded to fp16 before its consumer, as the separate launch would store it. Activations are fp16.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..hadamard.construct import sylvester

RUNS = 16  # runs of b entries per program: the smallest M of tl.dot
MIN_BLOCK = 16  # the smallest K and N of tl.dot


@dataclass(frozen=True)
class BlockSide:
    """One side's run-time parameters: its n signs (fp16 ±1) and its block b."""

    signs: torch.Tensor
    block: int

    @property
    def n(self) -> int:
        return self.signs.numel()


@functools.cache
def hadamard_tile(block: int, device: torch.device) -> torch.Tensor:
    """The unnormalised Sylvester H_b (±1) in fp16, the `tl.dot` operand of every kernel here."""
    return torch.from_numpy(sylvester(block)).to(device=device, dtype=torch.float16)


@functools.cache
def _unit_matrix(block: int, head_dim: int, device: torch.device) -> torch.Tensor:
    """(I ⊗ H_b)/√b over a unit of max(b, head_dim) entries, float32 (the RoPE kernel's mat-vec)."""
    unit = max(block, head_dim)
    h = torch.from_numpy(sylvester(block)).double() / math.sqrt(block)
    return torch.block_diag(*[h] * (unit // block)).to(device=device, dtype=torch.float32)


@triton.jit
def _runs(chunk, n, B: tl.constexpr, R: tl.constexpr):
    """Offsets (R, B) of runs chunk·R … chunk·R + R − 1 of a row of n entries, and their mask."""
    r = chunk * R + tl.arange(0, R)
    offs = r[:, None] * B + tl.arange(0, B)[None, :]
    return offs, offs < n


@triton.jit
def _mix(tile, h_ptr, B: tl.constexpr):
    """tile (R, B) fp16 times the unnormalised H_b (symmetric): each run's Hadamard transform, fp32."""
    i = tl.arange(0, B)
    return tl.dot(tile, tl.load(h_ptr + i[:, None] * B + i[None, :]))


@triton.jit
def _norm_rotate(x_ptr, w_ptr, s_ptr, h_ptr, y_ptr, n, eps, scale, NP: tl.constexpr, B: tl.constexpr,
                 R: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, NP)
    whole = tl.load(x_ptr + row * n + cols, mask=cols < n, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(whole * whole, axis=0) / n + eps)
    offs, mask = _runs(tl.program_id(1), n, B, R)
    x = tl.load(x_ptr + row * n + offs, mask=mask, other=0.0).to(tl.float32)
    normed = (x * inv).to(tl.float16)  # rounded before the weight, as Llama does
    h = tl.load(w_ptr + offs, mask=mask, other=0.0) * normed
    y = _mix(h * tl.load(s_ptr + offs, mask=mask, other=0.0), h_ptr, B) * scale
    tl.store(y_ptr + row * n + offs, y.to(tl.float16), mask=mask)


@triton.jit
def _rotate(x_ptr, sx, s_ptr, h_ptr, r_ptr, y_ptr, n, scale, B: tl.constexpr, R: tl.constexpr,
            SIGNS_FIRST: tl.constexpr, RESIDUAL: tl.constexpr):
    row = tl.program_id(0)
    offs, mask = _runs(tl.program_id(1), n, B, R)
    x = tl.load(x_ptr + row * sx + offs, mask=mask, other=0.0)
    s = tl.load(s_ptr + offs, mask=mask, other=0.0)
    if SIGNS_FIRST:  # an input side: Vᵀ x = H (s ⊙ x)
        y = _mix(x * s, h_ptr, B) * scale
    else:  # an output side: U z = s ⊙ H z, rounded as its own launch would store it
        y = (_mix(x, h_ptr, B) * scale * s).to(tl.float16).to(tl.float32)
    if RESIDUAL:
        y += tl.load(r_ptr + row * n + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * n + offs, y.to(tl.float16), mask=mask)


@triton.jit
def _silu_mul_rotate(g_ptr, u_ptr, sgr, sur, sg_ptr, su_ptr, sd_ptr, h_ptr, y_ptr, n, scale, B: tl.constexpr,
                     R: tl.constexpr):
    row = tl.program_id(0)
    offs, mask = _runs(tl.program_id(1), n, B, R)
    zg = tl.load(g_ptr + row * sgr + offs, mask=mask, other=0.0)
    zu = tl.load(u_ptr + row * sur + offs, mask=mask, other=0.0)
    g = (_mix(zg, h_ptr, B) * scale * tl.load(sg_ptr + offs, mask=mask, other=0.0)).to(tl.float16).to(tl.float32)
    u = (_mix(zu, h_ptr, B) * scale * tl.load(su_ptr + offs, mask=mask, other=0.0)).to(tl.float16).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(tl.float16).to(tl.float32)
    a = (silu * u).to(tl.float16)
    y = _mix(a * tl.load(sd_ptr + offs, mask=mask, other=0.0), h_ptr, B) * scale
    tl.store(y_ptr + row * n + offs, y.to(tl.float16), mask=mask)


@triton.jit
def _rope_cache_rotated(q_ptr, k_ptr, v_ptr, sq, sk, sv, uq_ptr, uk_ptr, uv_ptr, m_ptr, cos_ptr, sin_ptr, pos_ptr,
                        qo_ptr, kc_ptr, vc_ptr, T, H, HKV, L, D: tl.constexpr, U: tl.constexpr):
    bt = tl.program_id(0)  # b·T + t
    unit = tl.program_id(1)  # units of U columns: q's, then k's, then v's
    b, t = bt // T, bt % T
    qu, ku = H * D // U, HKV * D // U
    c = tl.arange(0, U)
    if unit < qu + ku:
        is_q = unit < qu
        j = tl.where(is_q, unit, unit - qu)
        x = tl.load(tl.where(is_q, q_ptr + bt * sq, k_ptr + bt * sk) + j * U + c).to(tl.float32)
        signs = tl.where(is_q, uq_ptr, uk_ptr) + j * U
        half = tl.arange(0, U // 2)
        first = (half // (D // 2)) * D + half % (D // 2)  # the unit's entries in the first half of a head
        m1 = tl.load(m_ptr + first[:, None] * U + c[None, :])
        m2 = tl.load(m_ptr + (first + D // 2)[:, None] * U + c[None, :])
        y1 = (tl.sum(m1 * x[None, :], axis=1) * tl.load(signs + first)).to(tl.float16).to(tl.float32)
        y2 = (tl.sum(m2 * x[None, :], axis=1) * tl.load(signs + first + D // 2)).to(tl.float16).to(tl.float32)
        i = half % (D // 2)
        c1, c2 = tl.load(cos_ptr + t * D + i), tl.load(cos_ptr + t * D + D // 2 + i)
        s1, s2 = tl.load(sin_ptr + t * D + i), tl.load(sin_ptr + t * D + D // 2 + i)
        o1, o2 = y1 * c1 - y2 * s1, y2 * c2 + y1 * s2
        head = j * (U // D) + half // (D // 2)
        if is_q:
            dst = qo_ptr + ((b * H + head) * T + t) * D + i
        else:
            dst = kc_ptr + ((b * HKV + head) * L + tl.load(pos_ptr + t)) * D + i
        tl.store(dst, o1.to(tl.float16))
        tl.store(dst + D // 2, o2.to(tl.float16))
    else:
        jv = unit - qu - ku  # (names apart from the branch above: Triton types them per branch)
        xv = tl.load(v_ptr + bt * sv + jv * U + c).to(tl.float32)
        m = tl.load(m_ptr + c[:, None] * U + c[None, :])
        yv = tl.sum(m * xv[None, :], axis=1) * tl.load(uv_ptr + jv * U + c)
        hv = jv * (U // D) + c // D
        tl.store(vc_ptr + ((b * HKV + hv) * L + tl.load(pos_ptr + t)) * D + c % D, yv.to(tl.float16))


def _grid(rows: int, side: BlockSide) -> tuple[int, int]:
    return rows, triton.cdiv(side.n // side.block, RUNS)


def _scale(side: BlockSide) -> float:
    return 1.0 / math.sqrt(side.block)


def norm_rotate(x: torch.Tensor, weight: torch.Tensor, eps: float, side: BlockSide) -> torch.Tensor:
    """Vᵀ · RMSNorm(x) for x (..., n) fp16: Llama's RMSNorm, then the input side, one launch."""
    rows = x.reshape(-1, x.shape[-1])
    y = torch.empty_like(rows)
    n = rows.shape[1]
    _norm_rotate[_grid(rows.shape[0], side)](rows, weight, side.signs, hadamard_tile(side.block, x.device), y, n,
                                             eps, _scale(side), NP=triton.next_power_of_2(n), B=side.block, R=RUNS)
    return y.view(x.shape)


def rotate(x: torch.Tensor, side: BlockSide, input_side: bool, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Rows x (N, n) (rows may be strided, columns contiguous) through an input side (Vᵀ x) or an output
    side (U z, + residual (N, n) when given)."""
    y = torch.empty(x.shape, dtype=torch.float16, device=x.device)
    res = residual.contiguous() if residual is not None else y
    _rotate[_grid(x.shape[0], side)](x, x.stride(0), side.signs, hadamard_tile(side.block, x.device), res, y,
                                     side.n, _scale(side), B=side.block, R=RUNS, SIGNS_FIRST=input_side,
                                     RESIDUAL=residual is not None)
    return y


def silu_mul_rotate(gate: torch.Tensor, up: torch.Tensor, gate_out: BlockSide, up_out: BlockSide,
                    down_in: BlockSide) -> torch.Tensor:
    """down's rotated input from gate's and up's raw GEMV outputs (N, n): Vᵀ_down (SiLU(U_g z_g) ⊙ U_u z_u)."""
    y = torch.empty(gate.shape, dtype=torch.float16, device=gate.device)
    block = down_in.block
    _silu_mul_rotate[_grid(gate.shape[0], down_in)](gate, up, gate.stride(0), up.stride(0), gate_out.signs,
                                                    up_out.signs, down_in.signs, hadamard_tile(block, gate.device),
                                                    y, down_in.n, _scale(down_in), B=block, R=RUNS)
    return y


def rope_into_cache_rotated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sides: tuple[BlockSide, ...],
                            cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor) -> torch.Tensor:
    """`fused.rope_into_cache` on q/k/v's raw GEMV outputs (B, T, ·), each through its output side first."""
    b, t, _ = q.shape
    hkv, length, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    heads = q.shape[-1] // d
    block = sides[0].block
    unit = max(block, d)
    q_out = torch.empty(b, heads, t, d, dtype=torch.float16, device=q.device)
    grid = (b * t, (heads + 2 * hkv) * d // unit)
    _rope_cache_rotated[grid](q, k, v, q.stride(1), k.stride(1), v.stride(1), *(s.signs for s in sides),
                              _unit_matrix(block, d, q.device), cos.contiguous(), sin.contiguous(), pos, q_out,
                              k_cache, v_cache, t, heads, hkv, length, D=d, U=unit)
    return q_out
