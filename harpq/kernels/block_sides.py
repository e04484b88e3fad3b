"""Hadamard sides fused into the decode step's own kernels.

A side of the RHT family is (A ⊗ H_b)·diag(s) (`Side.kernel_form`): signs, the Sylvester H_b on each run of b
consecutive entries, and A, a ±1 matrix mixing the runs: the identity for `rht-block`, H_K ⊗ H_{p/b} for the
full RHT of n = K·p. Applied as launches of their own, a decoder layer's sides cost a dozen or more launches
per token; but the kernels that produce a linear's input or consume its output hold the tile anyway:

- q/k/v's and gate/up's shared input side: in the RMSNorm that makes their input (`norm_rotate`);
- q/k/v's output sides: in the RoPE + cache-write kernel (`rope_into_cache_rotated`);
- gate/up's output sides and down's input side: in the SiLU·up kernel (`silu_mul_rotate`);
- o's input side, and o's and down's output sides with the residual add: one launch each (`rotate`).

Without A (`rht-block`, and HARP's `block` schedule, whose learned stages take H_b's place in each run,
`ButterflySide`) a program takes one run (`STAGE_RUNS`) through its stages in fp32 registers, each stage one
broadcast product over its digit (transposed and in reverse order for an output side): H_b as its Sylvester
factors (radix 8, 8, 2 for b = 128; one run's blocks that every program reads from cache), or the run's own
learned blocks. Every stage's blocks are requested before the first product, as flat contiguous loads, so that
the stages wait on memory once, not once each; and one run per program spreads a row over many SMs.
With A a program takes a whole row: each run times H_b is one `tl.dot` ([runs, b] · [b, b], fp16 in, fp32 out:
the ±1 entries make every product exact), then 1/√b in fp32; A multiplies the fp32 result as two fp16 dots
(high and low halves: ~22 bits), then 1/√(runs). Rounding follows the unfused path: an output side's result
is rounded to fp16 before its consumer, as the separate launch would store it. Activations are fp16.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..hadamard.construct import sylvester

RUNS = 16  # runs of b entries a program writes with a split A: the smallest M of tl.dot
#: runs a program takes through the stages (a [runs, b, radix] product tile each): one puts the most programs on
#: the GPU's SMs; `HARPQ_STAGE_RUNS` for measurements
STAGE_RUNS = int(os.environ.get("HARPQ_STAGE_RUNS", "1"))
STAGE_WARPS = int(os.environ.get("HARPQ_STAGE_WARPS", "4"))  # warps of a program that takes runs through stages
MAX_STAGES = 3  # learned stages inside a run: radix 8, 8, 2 for runs of 128
MIN_BLOCK = 16  # the smallest K and N of tl.dot
WHOLE_RUNS = 64  # up to this many runs a program applies all of A (writes the whole row)
MAX_RUNS = 256  # up to this many a program reads the whole row and writes 16 runs of it (rows of A)


@dataclass(frozen=True)
class BlockSide:
    """One side as the kernels take it: its n signs (fp16 ±1), its block b, and A (fp16 ±1, zero-padded to
    a power of two ≥ 16 runs) or None. Without A the runs go through stages: their radices and blocks
    (float32), either learned (each run its own, in the order of `kernel_stages`; an output side's blocks
    transposed, `Side.run_stages`) or `shared`: H_b's Sylvester factors, one run's blocks that every run reads."""

    signs: torch.Tensor
    block: int
    outer: torch.Tensor | None = None
    stages: torch.Tensor | None = None
    radices: tuple[int, ...] = ()
    shared: bool = False

    @property
    def n(self) -> int:
        return self.signs.numel()

    @property
    def runs(self) -> int:
        return self.n // self.block

    @property
    def learned(self) -> bool:
        return self.stages is not None and not self.shared

    @property
    def padded_runs(self) -> int:
        """Runs a program reads: `STAGE_RUNS` through stages, all of the row (padded) with A."""
        return STAGE_RUNS if self.outer is None else self.outer.shape[0]

    @property
    def split(self) -> bool:
        """A program writes 16 runs of the row (rows of A), not all of it."""
        return self.outer is not None and self.runs > WHOLE_RUNS

    @property
    def written_runs(self) -> int:
        """Runs a program writes."""
        return RUNS if self.split else self.padded_runs

    @classmethod
    def build(cls, signs: torch.Tensor, block: int, outer: torch.Tensor | None,
              stages: tuple[list[int], torch.Tensor] | None = None) -> BlockSide | None:
        """The kernels' view of a side, or None where they cannot take it (block under 16, A over 256 runs,
        runs of more than three stages)."""
        if block < MIN_BLOCK or signs.dtype != torch.float16:
            return None
        if stages is not None:
            radices, blocks = stages
            if outer is not None or len(radices) > MAX_STAGES or math.prod(radices) != block:
                return None
            return cls(signs, block, stages=kernel_stages(blocks, radices, block).to(signs.device),
                       radices=tuple(radices))
        if outer is None:
            radices = _factors(block)
            if len(radices) > MAX_STAGES:
                return None
            stages = _sylvester_factors(block, radices, signs.device)
            return cls(signs, block, stages=stages, radices=radices, shared=True)
        runs = outer.shape[0]
        if runs > MAX_RUNS:
            return None
        return cls(signs, block, _padded(outer, max(RUNS, triton.next_power_of_2(runs)), signs.device))


def kernel_stages(blocks: torch.Tensor, radices: list[int], block: int) -> torch.Tensor:
    """Stage blocks (stage after stage, each (n / radix, radix, radix), the block of run r, high digits h and
    low digits l at (r·HI + h)·LO + l) reordered so that a run's blocks of a stage are one contiguous
    (HI, radix, radix, LO) stretch: the layout `_stage_blocks` loads flat into its product's shape. float32."""
    n = blocks.numel() // sum(radices)
    parts, at, lo = [], 0, 1
    for radix in radices:
        stage = blocks[at:at + n * radix].reshape(n // block, block // (radix * lo), lo, radix, radix)
        parts.append(stage.permute(0, 1, 3, 4, 2).reshape(-1))
        at, lo = at + n * radix, lo * radix
    return torch.cat(parts).to(torch.float32).contiguous()


def _factors(block: int) -> tuple[int, ...]:
    """Radices of H_b's stages: 8 while it divides, then the rest (128 = 8·8·2)."""
    radices = []
    while block > 8:
        radices.append(8)
        block //= 8
    return tuple(radices + [block])


@functools.cache
def _sylvester_factors(block: int, radices: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One run's stage blocks of H_b / √b in the order of `kernel_stages`: H_r / √r at every position of each
    stage (Sylvester's H_{2^k} is H_2's k-fold Kronecker power, so any grouping of its digits factors it). Every
    run reads these same blocks, from L1 or L2."""
    stages = []
    for radix in radices:
        h = torch.from_numpy(sylvester(radix)).double() / math.sqrt(radix)
        stages.append(h.reshape(1, radix, radix).expand(block // radix, radix, radix).reshape(-1))
    return kernel_stages(torch.cat(stages), list(radices), block).to(device)


def _padded(outer: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    a = torch.zeros(size, size, dtype=torch.float16)
    a[:outer.shape[0], :outer.shape[1]] = outer
    return a.to(device)


@functools.cache
def hadamard_tile(block: int, device: torch.device) -> torch.Tensor:
    """The unnormalised Sylvester H_b (±1) in fp16, the `tl.dot` operand of every kernel here."""
    return torch.from_numpy(sylvester(block)).to(device=device, dtype=torch.float16)


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
def _mix_outer(y, a_ptr, R: tl.constexpr):
    """A (R, R) fp16 ±1 times y (R, B) fp32, as two exact-product fp16 dots of y's high and low halves."""
    i = tl.arange(0, R)
    a = tl.load(a_ptr + i[:, None] * R + i[None, :])
    hi = y.to(tl.float16)
    return tl.dot(a, hi) + tl.dot(a, (y - hi.to(tl.float32)).to(tl.float16))


@triton.jit
def _stage_blocks(k_ptr, offset, first_run, n, R: tl.constexpr, B: tl.constexpr, RADIX: tl.constexpr,
                  LO: tl.constexpr, SHARED: tl.constexpr):
    """One stage's blocks (radix RADIX at stride LO, at k_ptr + offset) for runs first_run … first_run + R − 1,
    as (R, HI, out digit, in digit, LO): learned ones in the order of `kernel_stages`, one flat contiguous load
    (it vectorizes, and it is requested before any product so that the stages' loads overlap); with SHARED
    every run's are the one run's at k_ptr."""
    HI: tl.constexpr = B // (RADIX * LO)
    i = tl.arange(0, R * B * RADIX)
    if SHARED:
        k = tl.load(k_ptr + offset + i % (B * RADIX))
    else:
        k = tl.load(k_ptr + offset + first_run * (B * RADIX) + i, mask=first_run + i // (B * RADIX) < n // B,
                    other=0.0)
    return tl.reshape(k, [R, HI, RADIX, RADIX, LO])


@triton.jit
def _stage_apply(x, k, R: tl.constexpr, B: tl.constexpr, RADIX: tl.constexpr, LO: tl.constexpr):
    """x (R, B) fp32 through one stage's blocks k (`_stage_blocks`): each position's block times its digit."""
    HI: tl.constexpr = B // (RADIX * LO)
    x5 = tl.reshape(x, [R, HI, 1, RADIX, LO])  # entry h·RADIX·LO + c·LO + l, the input digit c on axis 3
    return tl.reshape(tl.sum(k * x5, axis=3), [R, B])


@triton.jit
def _run_stages(x, k_ptr, first_run, n, R: tl.constexpr, B: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
                S3: tl.constexpr, TRANSPOSE: tl.constexpr, SHARED: tl.constexpr):
    """The stages of runs first_run … first_run + R − 1 (radices S1, S2, S3; 0: none) on x (R, B) fp32:
    B_3 B_2 B_1 x, or with TRANSPOSE (blocks stored transposed, `kernel_stages`) B_1ᵀ B_2ᵀ B_3ᵀ x. Stage t's
    blocks start after the n·radix of those before (SHARED: one run's, B·radix)."""
    at2 = B * S1 if SHARED else n * S1
    at3 = at2 + (B * S2 if SHARED else n * S2)
    if TRANSPOSE:  # every stage's blocks requested first, in the order of use, so that their loads overlap
        if S3 > 0:
            k3 = _stage_blocks(k_ptr, at3, first_run, n, R, B, S3, S1 * S2, SHARED)
        if S2 > 0:
            k2 = _stage_blocks(k_ptr, at2, first_run, n, R, B, S2, S1, SHARED)
        k1 = _stage_blocks(k_ptr, 0, first_run, n, R, B, S1, 1, SHARED)
        if S3 > 0:
            x = _stage_apply(x, k3, R, B, S3, S1 * S2)
        if S2 > 0:
            x = _stage_apply(x, k2, R, B, S2, S1)
        x = _stage_apply(x, k1, R, B, S1, 1)
    else:
        k1 = _stage_blocks(k_ptr, 0, first_run, n, R, B, S1, 1, SHARED)
        if S2 > 0:
            k2 = _stage_blocks(k_ptr, at2, first_run, n, R, B, S2, S1, SHARED)
        if S3 > 0:
            k3 = _stage_blocks(k_ptr, at3, first_run, n, R, B, S3, S1 * S2, SHARED)
        x = _stage_apply(x, k1, R, B, S1, 1)
        if S2 > 0:
            x = _stage_apply(x, k2, R, B, S2, S1)
        if S3 > 0:
            x = _stage_apply(x, k3, R, B, S3, S1 * S2)
    return x


@triton.jit
def _side(tile, h_ptr, a_ptr, chunk, n, scale, scale_runs, B: tl.constexpr, RIN: tl.constexpr, ROUT: tl.constexpr,
          MIX: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr, SHARED: tl.constexpr,
          TRANSPOSE: tl.constexpr):
    """A side on a tile (RIN, B) fp16 of runs, normalised, fp32. Without A (S1 > 0) the tile's runs through
    their stages (blocks at a_ptr; transposed, in reverse, for an output side: TRANSPOSE); with A (MIX), (A ⊗ H_b)
    on the whole row (the tile), giving its runs chunk·ROUT … chunk·ROUT + ROUT − 1 (all where ROUT = RIN)."""
    if S1 > 0:
        y = _run_stages(tile.to(tl.float32), a_ptr, chunk * RIN, n, RIN, B, S1, S2, S3, TRANSPOSE, SHARED)
    else:
        y = _mix(tile, h_ptr, B) * scale
        i = chunk * ROUT + tl.arange(0, ROUT)
        j = tl.arange(0, RIN)
        a = tl.load(a_ptr + i[:, None] * RIN + j[None, :])
        hi = y.to(tl.float16)
        y = (tl.dot(a, hi) + tl.dot(a, (y - hi.to(tl.float32)).to(tl.float16))) * scale_runs
    return y


@triton.jit
def _tiles(n, B: tl.constexpr, RIN: tl.constexpr, ROUT: tl.constexpr, MIX: tl.constexpr):
    """(offsets, mask) of the runs a program reads and of those it writes."""
    chunk = tl.program_id(1)
    offs_in, mask_in = _runs(0 if MIX else chunk, n, B, RIN)
    offs_out, mask_out = _runs(chunk, n, B, ROUT)
    return chunk, offs_in, mask_in, offs_out, mask_out


@triton.jit
def _norm_rotate(x_ptr, w_ptr, s_ptr, h_ptr, a_ptr, y_ptr, n, eps, scale, scale_runs, NP: tl.constexpr,
                 B: tl.constexpr, RIN: tl.constexpr, ROUT: tl.constexpr, MIX: tl.constexpr, S1: tl.constexpr,
                 S2: tl.constexpr, S3: tl.constexpr, SHARED: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, NP)
    whole = tl.load(x_ptr + row * n + cols, mask=cols < n, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(whole * whole, axis=0) / n + eps)
    chunk, offs, mask, offs_out, mask_out = _tiles(n, B, RIN, ROUT, MIX)
    x = tl.load(x_ptr + row * n + offs, mask=mask, other=0.0).to(tl.float32)
    normed = (x * inv).to(tl.float16)  # rounded before the weight, as Llama does
    h = tl.load(w_ptr + offs, mask=mask, other=0.0) * normed
    y = _side(h * tl.load(s_ptr + offs, mask=mask, other=0.0), h_ptr, a_ptr, chunk, n, scale, scale_runs, B, RIN,
              ROUT, MIX, S1, S2, S3, SHARED, False)
    tl.store(y_ptr + row * n + offs_out, y.to(tl.float16), mask=mask_out)


@triton.jit
def _rotate(x_ptr, sx, s_ptr, h_ptr, a_ptr, r_ptr, y_ptr, n, scale, scale_runs, B: tl.constexpr, RIN: tl.constexpr,
            ROUT: tl.constexpr, MIX: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr,
            SHARED: tl.constexpr, SIGNS_FIRST: tl.constexpr, RESIDUAL: tl.constexpr):
    row = tl.program_id(0)
    chunk, offs, mask, offs_out, mask_out = _tiles(n, B, RIN, ROUT, MIX)
    x = tl.load(x_ptr + row * sx + offs, mask=mask, other=0.0)
    if SIGNS_FIRST:  # an input side: Vᵀ x = H (s ⊙ x)
        x = x * tl.load(s_ptr + offs, mask=mask, other=0.0)
        y = _side(x, h_ptr, a_ptr, chunk, n, scale, scale_runs, B, RIN, ROUT, MIX, S1, S2, S3, SHARED, False)
    else:  # an output side: U z = s ⊙ H z, rounded as its own launch would store it
        y = _side(x, h_ptr, a_ptr, chunk, n, scale, scale_runs, B, RIN, ROUT, MIX, S1, S2, S3, SHARED, True)
        y = (y * tl.load(s_ptr + offs_out, mask=mask_out, other=0.0)).to(tl.float16).to(tl.float32)
    if RESIDUAL:
        y += tl.load(r_ptr + row * n + offs_out, mask=mask_out, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * n + offs_out, y.to(tl.float16), mask=mask_out)


@triton.jit
def _silu_mul_rotate(g_ptr, u_ptr, sgr, sur, sg_ptr, su_ptr, sd_ptr, h_ptr, ag_ptr, au_ptr, ad_ptr, y_ptr, n, scale,
                     scale_runs, B: tl.constexpr, RIN: tl.constexpr, ROUT: tl.constexpr, MIX: tl.constexpr,
                     S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr, SHARED: tl.constexpr, DOWN: tl.constexpr):
    row = tl.program_id(0)
    chunk, offs, mask, offs_out, mask_out = _tiles(n, B, RIN, ROUT, MIX)
    zg = tl.load(g_ptr + row * sgr + offs, mask=mask, other=0.0)
    zu = tl.load(u_ptr + row * sur + offs, mask=mask, other=0.0)
    g = _side(zg, h_ptr, ag_ptr, chunk, n, scale, scale_runs, B, RIN, ROUT, MIX, S1, S2, S3, SHARED, True)
    u = _side(zu, h_ptr, au_ptr, chunk, n, scale, scale_runs, B, RIN, ROUT, MIX, S1, S2, S3, SHARED, True)
    g = (g * tl.load(sg_ptr + offs_out, mask=mask_out, other=0.0)).to(tl.float16).to(tl.float32)
    u = (u * tl.load(su_ptr + offs_out, mask=mask_out, other=0.0)).to(tl.float16).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(tl.float16).to(tl.float32)
    a = (silu * u).to(tl.float16)
    if DOWN:  # down's input side too (the program holds the runs it needs: ROUT = RIN)
        a = _side(a * tl.load(sd_ptr + offs_out, mask=mask_out, other=0.0), h_ptr, ad_ptr, chunk, n, scale,
                  scale_runs, B, ROUT, ROUT, MIX, S1, S2, S3, SHARED, False)
    tl.store(y_ptr + row * n + offs_out, a.to(tl.float16), mask=mask_out)


@triton.jit
def _unit_stages(x, k_ptr, unit, n, U: tl.constexpr, B: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
                 S3: tl.constexpr, SHARED: tl.constexpr):
    """An output side's stages (transposed) on one unit x (U,) fp32 of a row of n: its U / B runs."""
    y = _run_stages(tl.reshape(x, [U // B, B]), k_ptr, unit * (U // B), n, U // B, B, S1, S2, S3, True, SHARED)
    return tl.reshape(y, [U])


@triton.jit
def _halves(y, U: tl.constexpr, D: tl.constexpr):
    """The first and the second half of each head of a unit y (U,): two (U / 2,) vectors, head after head."""
    y3 = tl.reshape(y, [U // D, 2, D // 2])
    which = tl.arange(0, 2)[None, :, None]
    first = tl.sum(tl.where(which == 0, y3, 0.0), axis=1)
    second = tl.sum(tl.where(which == 1, y3, 0.0), axis=1)
    return tl.reshape(first, [U // 2]), tl.reshape(second, [U // 2])


@triton.jit
def _rope_cache_rotated(q_ptr, k_ptr, v_ptr, sq, sk, sv, uq_ptr, uk_ptr, uv_ptr, kq_ptr, kk_ptr, kv_ptr,
                        cos_ptr, sin_ptr, pos_ptr, qo_ptr, kc_ptr, vc_ptr, T, H, HKV, L, D: tl.constexpr,
                        U: tl.constexpr, B: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr,
                        SHARED: tl.constexpr):
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
        # the unit through its runs' stages, then its heads' halves
        y = _unit_stages(x, tl.where(is_q, kq_ptr, kk_ptr), j, tl.where(is_q, H, HKV) * D, U, B, S1, S2, S3, SHARED)
        y1, y2 = _halves((y * tl.load(signs + c)).to(tl.float16).to(tl.float32), U, D)
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
        yv = _unit_stages(xv, kv_ptr, jv, HKV * D, U, B, S1, S2, S3, SHARED) * tl.load(uv_ptr + jv * U + c)
        hv = jv * (U // D) + c // D
        tl.store(vc_ptr + ((b * HKV + hv) * L + tl.load(pos_ptr + t)) * D + c % D, yv.to(tl.float16))


@triton.jit
def _mixed_rows(src, signs, a_ptr, h_ptr, heads, scale, scale_runs, D: tl.constexpr, R: tl.constexpr,
                COLS: tl.constexpr, OFFSET: tl.constexpr):
    """Columns OFFSET … OFFSET + COLS − 1 of each head of one row after its output side (A ⊗ H_D, signs;
    a head is a run), rounded to fp16 as the separate launch would store them; fp32 (R, COLS)."""
    r = tl.arange(0, R)
    c = tl.arange(0, D)
    j = tl.arange(0, COLS)
    on = r[:, None] < heads
    x = tl.load(src + r[:, None] * D + c[None, :], mask=on, other=0.0)
    y = _mix_outer(tl.dot(x, tl.load(h_ptr + c[:, None] * D + OFFSET + j[None, :])) * scale, a_ptr, R) * scale_runs
    s = tl.load(signs + r[:, None] * D + OFFSET + j[None, :], mask=on, other=0.0)
    return (y * s).to(tl.float16).to(tl.float32)


@triton.jit
def _rope_rows(src, signs, a_ptr, h_ptr, cos_ptr, sin_ptr, dst, dst_stride, t, heads, scale, scale_runs,
               D: tl.constexpr, R: tl.constexpr):
    """One row's heads through its output side and the rotary embedding; head r stored at dst + r·dst_stride."""
    y1 = _mixed_rows(src, signs, a_ptr, h_ptr, heads, scale, scale_runs, D, R, D // 2, 0)
    y2 = _mixed_rows(src, signs, a_ptr, h_ptr, heads, scale, scale_runs, D, R, D // 2, D // 2)
    half = tl.arange(0, D // 2)
    c1, c2 = tl.load(cos_ptr + t * D + half)[None, :], tl.load(cos_ptr + t * D + D // 2 + half)[None, :]
    s1, s2 = tl.load(sin_ptr + t * D + half)[None, :], tl.load(sin_ptr + t * D + D // 2 + half)[None, :]
    r = tl.arange(0, R)
    on = r[:, None] < heads
    at = dst + r[:, None] * dst_stride + half[None, :]
    tl.store(at, (y1 * c1 - y2 * s1).to(tl.float16), mask=on)
    tl.store(at + D // 2, (y2 * c2 + y1 * s2).to(tl.float16), mask=on)


@triton.jit
def _rope_cache_mixed(q_ptr, k_ptr, v_ptr, sq, sk, sv, uq_ptr, uk_ptr, uv_ptr, aq_ptr, ak_ptr, av_ptr, h_ptr, cos_ptr,
                      sin_ptr, pos_ptr, qo_ptr, kc_ptr, vc_ptr, T, H, HKV, L, scale, scale_q, scale_kv,
                      D: tl.constexpr, RQ: tl.constexpr, RKV: tl.constexpr):
    bt = tl.program_id(0)  # b·T + t
    which = tl.program_id(1)  # q, k, v: a whole row each (A mixes its heads)
    b, t = bt // T, bt % T
    if which == 0:
        _rope_rows(q_ptr + bt * sq, uq_ptr, aq_ptr, h_ptr, cos_ptr, sin_ptr, qo_ptr + (b * H * T + t) * D, T * D,
                   t, H, scale, scale_q, D, RQ)
    elif which == 1:
        _rope_rows(k_ptr + bt * sk, uk_ptr, ak_ptr, h_ptr, cos_ptr, sin_ptr,
                   kc_ptr + (b * HKV * L + tl.load(pos_ptr + t)) * D, L * D, t, HKV, scale, scale_kv, D, RKV)
    else:
        y = _mixed_rows(v_ptr + bt * sv, uv_ptr, av_ptr, h_ptr, HKV, scale, scale_kv, D, RKV, D, 0)
        r = tl.arange(0, RKV)
        c = tl.arange(0, D)
        at = vc_ptr + (b * HKV * L + tl.load(pos_ptr + t)) * D + r[:, None] * (L * D) + c[None, :]
        tl.store(at, y.to(tl.float16), mask=r[:, None] < HKV)


def rope_sides_fuse(sides: tuple[BlockSide | None, ...], head_dim: int) -> bool:
    """Whether `rope_into_cache_rotated` takes q/k/v's output sides: without A, one block (a program per
    unit of max(block, head) entries) and, for learned runs, one schedule; with A, heads as runs (block = head
    size), k and v alike."""
    if any(s is None for s in sides):
        return False
    if all(s.outer is None for s in sides):
        return len({(s.block, s.radices, s.shared) for s in sides}) == 1
    return all(s.outer is not None and s.block == head_dim and not s.split for s in sides) \
        and sides[1].padded_runs == sides[2].padded_runs


def _grid(rows: int, side: BlockSide) -> tuple[int, int]:
    return rows, triton.cdiv(side.runs, side.written_runs)


def _second(side: BlockSide | None, h: torch.Tensor) -> torch.Tensor:
    """The kernels' second operand of a side: its stages, or its A (every side has one or the other); without a
    side (never read) H_b."""
    if side is None:
        return h
    return side.stages if side.stages is not None else side.outer


def _args(side: BlockSide, device: torch.device) -> tuple:
    """H_b, the second operand (`_second`), 1/√b, 1/√runs."""
    h = hadamard_tile(side.block, device)
    return h, _second(side, h), 1.0 / math.sqrt(side.block), 1.0 / math.sqrt(side.runs)


def _radices(side: BlockSide) -> dict:
    r = (*side.radices, 0, 0, 0)
    return {"S1": r[0], "S2": r[1], "S3": r[2], "SHARED": side.shared}


def _shape(side: BlockSide) -> dict:
    return {"B": side.block, "RIN": side.padded_runs, "ROUT": side.written_runs, "MIX": side.outer is not None,
            **_radices(side), "num_warps": 8 if side.split else (4 if side.outer is not None else STAGE_WARPS)}


def norm_rotate(x: torch.Tensor, weight: torch.Tensor, eps: float, side: BlockSide) -> torch.Tensor:
    """Vᵀ · RMSNorm(x) for x (..., n) fp16: Llama's RMSNorm, then the input side, one launch."""
    rows = x.reshape(-1, x.shape[-1])
    y = torch.empty_like(rows)
    n = rows.shape[1]
    h, a, scale, scale_runs = _args(side, x.device)
    _norm_rotate[_grid(rows.shape[0], side)](rows, weight, side.signs, h, a, y, n, eps, scale, scale_runs,
                                             NP=triton.next_power_of_2(n), **_shape(side))
    return y.view(x.shape)


def rotate(x: torch.Tensor, side: BlockSide, input_side: bool, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Rows x (N, n) (rows may be strided, columns contiguous) through an input side (Vᵀ x) or an output
    side (U z, + residual (N, n) when given)."""
    y = torch.empty(x.shape, dtype=torch.float16, device=x.device)
    res = residual.contiguous() if residual is not None else y
    h, a, scale, scale_runs = _args(side, x.device)
    _rotate[_grid(x.shape[0], side)](x, x.stride(0), side.signs, h, a, res, y, side.n, scale, scale_runs,
                                     SIGNS_FIRST=input_side, RESIDUAL=residual is not None, **_shape(side))
    return y


def silu_mul_rotate(gate: torch.Tensor, up: torch.Tensor, gate_out: BlockSide, up_out: BlockSide,
                    down_in: BlockSide | None) -> torch.Tensor:
    """SiLU(U_g z_g) ⊙ U_u z_u from gate's and up's raw GEMV outputs (N, n), then through down's input side
    where given (`mlp_sides_fuse`: one block and form for the three; else the caller applies it)."""
    y = torch.empty(gate.shape, dtype=torch.float16, device=gate.device)
    h, ag, scale, scale_runs = _args(gate_out, gate.device)
    au, ad = _second(up_out, h), _second(down_in, h)
    sd = gate_out.signs if down_in is None else down_in.signs
    _silu_mul_rotate[_grid(gate.shape[0], gate_out)](gate, up, gate.stride(0), up.stride(0), gate_out.signs,
                                                     up_out.signs, sd, h, ag, au, ad, y, gate_out.n, scale,
                                                     scale_runs, DOWN=down_in is not None, **_shape(gate_out))
    return y


def _form(side: BlockSide) -> tuple:
    return side.block, side.outer is None, side.radices, side.shared, side.padded_runs, side.written_runs, side.n


def mlp_sides_fuse(gate_out: BlockSide | None, up_out: BlockSide | None, down_in: BlockSide | None) -> str | None:
    """How `silu_mul_rotate` takes these sides: "all" (gate's and up's output sides and down's input side),
    "outputs" (down's input side left to the caller: it is split, or of another form), or None."""
    if gate_out is None or up_out is None or _form(gate_out) != _form(up_out):
        return None
    if down_in is not None and _form(down_in) == _form(gate_out) and not gate_out.split:
        return "all"
    return "outputs"


def rope_into_cache_rotated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sides: tuple[BlockSide, ...],
                            cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor) -> torch.Tensor:
    """`fused.rope_into_cache` on q/k/v's raw GEMV outputs (B, T, ·), each through its output side first."""
    b, t, _ = q.shape
    hkv, length, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    heads = q.shape[-1] // d
    block = sides[0].block
    if sides[0].outer is not None:
        q_out = torch.empty(b, heads, t, d, dtype=torch.float16, device=q.device)
        _rope_cache_mixed[(b * t, 3)](q, k, v, q.stride(1), k.stride(1), v.stride(1), *(s.signs for s in sides),
                                      *(s.outer for s in sides), hadamard_tile(d, q.device), cos.contiguous(),
                                      sin.contiguous(), pos, q_out, k_cache, v_cache, t, heads, hkv, length,
                                      1.0 / math.sqrt(d), 1.0 / math.sqrt(heads), 1.0 / math.sqrt(hkv), D=d,
                                      RQ=sides[0].padded_runs, RKV=sides[1].padded_runs)
        return q_out
    unit = max(block, d)
    q_out = torch.empty(b, heads, t, d, dtype=torch.float16, device=q.device)
    grid = (b * t, (heads + 2 * hkv) * d // unit)
    _rope_cache_rotated[grid](q, k, v, q.stride(1), k.stride(1), v.stride(1), *(s.signs for s in sides),
                              *(s.stages for s in sides), cos.contiguous(),
                              sin.contiguous(), pos, q_out, k_cache, v_cache, t, heads, hkv, length, D=d, U=unit,
                              B=block, **_radices(sides[0]), num_warps=STAGE_WARPS)
    return q_out
