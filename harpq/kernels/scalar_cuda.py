"""CUDA backend for `ScalarGroups`: the decode GEMV of `cuda/scalar_gemv.cu` for batch 1–16.

What it needs beyond the stored tensors (`prepare`): one half2 (scale, zero) per (group, row),
group-major. What it covers: bits 1, 2, 3, 4, 8; groups whose runs of columns per thread tile them
(a group is a power-of-two number of runs, or the whole row); fp16 activations.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..formats import ScalarGroups
from . import nvrtc, tuning
from .backends import MAX_DECODE_BATCH, GemvBackend, register
from .tuning import launch_shape

SOURCE, ENTRY = "scalar_gemv.cu", "harpq_scalar_gemv"
#: weights through the TMA ring (`cuda/gemv_common.cuh`, BULK; sm_90 and newer): None where it measured faster
#: (`tuning.ring_pays`), True wherever the layout allows, False never; HARPQ_BULK=1 / 0 sets True / False
BULK: bool | None = {"1": True, "0": False}.get(os.environ.get("HARPQ_BULK", ""))
#: batch rows the kernel normalizes itself (NORM_ROWS of `cuda/gemv_common.cuh`); beyond, the norm is its own launch
NORM_MAX_BATCH = 2


def layout(fmt: ScalarGroups, n: int) -> tuple[int, int, int] | None:
    """(words per thread and step, log2 runs per group, step scale) of the kernel for this shape, or None.

    Integer zeros prefer a step (4 threads' runs of columns) inside one group, so the scale multiplies the
    step's fp32 products (step scale 1): one fp16 operation per weight pair less. Else, and first for fp16
    zeros (c − z costs that operation either way, and longer runs load more per step), a thread's run
    inside one group, the scale per weight pair (0)."""
    g = fmt.group_len(n)
    step_scales = (1, 0) if fmt.zero == "int" else (0, 1)
    nws = (3,) if fmt.bits == 3 else (4, 2, 1)
    # a benchmark may ask for one of them (`tuning.OVERRIDE`); the shape then has that layout or none
    step_scales = [s for s in step_scales if tuning.OVERRIDE.get("STEP_SCALE", s) == s]
    nws = [w for w in nws if tuning.OVERRIDE.get("NW", w) == w]
    for step_scale in step_scales:
        for nw in nws:
            run = 32 if fmt.bits == 3 else nw * 32 // fmt.bits  # columns a thread decodes per step
            if n % (4 * run):
                continue
            if g >= n:
                return nw, 31, 1  # one group per row: every run maps to group 0
            if g % ((4 if step_scale else 1) * run):
                continue
            runs = g // run
            if runs & (runs - 1) == 0:
                return nw, runs.bit_length() - 1, step_scale
    return None


def steps_per_row(bits: int, nw: int, n: int) -> int:
    """K-steps of a row of n codes: each covers 4 threads' runs (32 codes at 3 bits, else nw words' worth)."""
    return n // (4 * (32 if bits == 3 else nw * 32 // bits))


def whole_chunks(bits: int, n: int) -> bool:
    """Whether a row of n codes is whole chunks of the row-tiled layout (12 words at 3 bits, else 16)."""
    return (n * bits // 32) % (12 if bits == 3 else 16) == 0


def meta_groups(slot_steps: int, group_shift: int, align: int) -> int:
    """Most groups that one slot of `slot_steps` consecutive steps (4 runs each) touches; a slot starts at a
    multiple of `align` steps (the steps of one chunk)."""
    if group_shift >= 31:
        return 1
    return max(((4 * (a + slot_steps) - 1) >> group_shift) - ((4 * a) >> group_shift) + 1
               for a in range(0, 256 * align, align))


def bulk_defines(bits: int, nw: int, n: int, group_shift: int, shape: dict[str, int],
                 norm_bytes: int) -> dict[str, int]:
    """The TMA ring (`BULK`) of a tiled layout: slots of SLOT_STEPS steps (whole chunks) per warp, as many as the
    shared memory left to each block holds (48 KB less the folded norm's copy, shared by the blocks an SM holds;
    the reduction reuses the ring), or {} where rows are not whole chunks or no slot fits."""
    if not whole_chunks(bits, n):
        return {}
    step_words = 4 * nw
    per_chunk = (12 if bits == 3 else 16) // step_words
    per_block = min(48 * 1024 - norm_bytes, 200 * 1024 // shape.get("MIN_BLOCKS", 2)) - 1024
    asked = [shape["SLOT_STEPS"]] if "SLOT_STEPS" in shape else None
    for slot_steps in asked or sorted({max(2, per_chunk), per_chunk}, reverse=True):
        groups = meta_groups(slot_steps, group_shift, per_chunk)
        slot_bytes = 4 * shape["MT"] * (slot_steps * 16 * step_words + 16 * groups)
        slots = min(8, per_block // (shape["WARPS"] * slot_bytes))
        if slots >= 1:
            return {"BULK": 1, "SLOTS": slots, "SLOT_STEPS": slot_steps, "META_GROUPS": groups}
    return {}


def defines(bits: int, int_zero: bool, nw: int, step_scale: int, m: int, n: int, batch: int,
            device_index: int = 0, tiled: bool = False, norm: bool = False, glu: bool = False,
            group_shift: int = 31, bulk: bool | None = False) -> tuple[tuple[str, int], ...]:
    """The kernel's compile-time configuration; `bulk`: the TMA ring (sm_90 on) where the layout allows it
    (True), where it also measured faster (None: `tuning.ring_pays`), or not (False)."""
    steps = steps_per_row(bits, nw, n)
    shape = launch_shape(m, steps, nw, batch, device_index, in_flight=4, xearly_many=0, one_wave=True, paired=glu,
                         norm=norm)
    config = {"BITS": bits, "INT_ZERO": int(int_zero), "NW": nw, "STEP_SCALE": step_scale, "TILED": int(tiled),
              "FULL_CHUNKS": int(tiled and whole_chunks(bits, n)), "NORM": int(norm), "GLU": int(glu), **shape}
    if bulk is None:
        bulk = tuning.ring_pays(m, steps, batch, device_index)
    if tiled and shape.get("BULK", int(bulk)):
        norm_bytes = nvrtc.norm_shared(batch, n) if norm else 0
        config.update({**bulk_defines(bits, nw, n, group_shift, shape, norm_bytes), **tuning.OVERRIDE})
    return tuple(sorted(config.items()))


@torch.library.custom_op("harpq::scalar_gemv", mutates_args=())
def scalar_gemv(x: torch.Tensor, codes: torch.Tensor, meta: torch.Tensor, bits: int, int_zero: bool, nw: int,
                group_shift: int, step_scale: int, residual: torch.Tensor | None = None,
                tiled: bool = False, norm_weight: torch.Tensor | None = None, norm_eps: float = 0.0,
                glu: bool = False) -> torch.Tensor:
    """x (B, n) fp16, codes (m, words) int32 (rows or, `tiled`, row-tiled), meta (m / 16 rounded up, groups,
    16) int32 = half2 (scale, zero), tile-major [, residual (B, m) fp16, added] [, norm_weight (n,) fp16: the
    input is RMSNorm(x) with this weight and `norm_eps`, B ≤ NORM_MAX_BATCH] -> (B, m) fp16; with `glu` the
    matrix is [gate; up] and the result silu(gate) · up, (B, m / 2)."""
    if x.data_ptr() % 16 or not x.is_contiguous():
        x = x.contiguous().clone()
    batch, n = x.shape
    m = codes.shape[0]
    if norm_weight is not None:
        norm_weight = nvrtc.norm_arg(norm_weight, batch, n, NORM_MAX_BATCH)
    if glu and m % 32:
        raise ValueError(f"a gate/up GEMV needs a multiple of 32 rows, got {m}")
    if glu and residual is not None:
        raise ValueError("a gate/up GEMV adds no residual")
    y = torch.empty(batch, m // 2 if glu else m, dtype=torch.float16, device=x.device)
    if codes.data_ptr() % 16:  # 16-byte loads and TMA copies need 16-byte aligned codes
        codes = codes.clone()
    device = x.device.index or 0
    d = dict(defines(bits, int_zero, nw, step_scale, m, n, batch, device, tiled, norm_weight is not None, glu,
                     group_shift, BULK if tuning.tma_capable(device) else False))
    kern = nvrtc.kernel(SOURCE, ENTRY, tuple(sorted(d.items())), x.device.index or 0)
    blocks = m // 32 if glu else -(-m // (16 * d["MT"]))
    shared = 0 if norm_weight is None else nvrtc.norm_shared(batch, n)
    grid, split = nvrtc.gemv_split(kern, blocks, d["WARPS"] * 32, steps_per_row(bits, nw, n), shared,
                                   allowed=not d.get("BULK", 0))
    nvrtc.launch(kern, grid, d["WARPS"] * 32, nvrtc.ptr(x), np.int32(batch), nvrtc.ptr(codes),
                 np.int32(codes.shape[1]), nvrtc.ptr(meta), np.int32(group_shift), np.int32(meta.shape[1]),
                 nvrtc.ptr(y),
                 nvrtc.ptr(nvrtc.residual_arg(residual, batch, m)), np.int32(m), np.int32(n),
                 nvrtc.ptr(norm_weight), np.float32(norm_eps), *split, shared=shared)
    return y


@scalar_gemv.register_fake
def _(x, codes, meta, bits, int_zero, nw, group_shift, step_scale, residual=None, tiled=False, norm_weight=None,
      norm_eps=0.0, glu=False):
    return x.new_empty(x.shape[0], codes.shape[0] // 2 if glu else codes.shape[0])


class ScalarCuda(GemvBackend):
    name = "cuda"

    def unusable(self, fmt, x, m, n):
        why = nvrtc.decode_unusable(x, MAX_DECODE_BATCH)
        if why is None and layout(fmt, n) is None:
            why = f"{fmt.bits}-bit groups of {fmt.group_len(n)} over {n} columns"
        return why

    def prepare(self, fmt, buffers, m, n):
        scale, zero = fmt.scale_zero(buffers, m, n)
        pairs = torch.stack([scale.half(), zero.half()], dim=-1).contiguous()  # exact: both are fp16 values
        words = pairs.view(torch.int32).view(m, -1)
        tiles = -(-m // 16)
        if m % 16:
            words = torch.cat([words, words.new_zeros(16 * tiles - m, words.shape[1])])
        return (words.view(tiles, 16, -1).transpose(1, 2).contiguous(),)  # (tiles, groups, 16)

    def folds_norm(self, x):
        return nvrtc.norm_fits(x.shape[0], x.shape[1], NORM_MAX_BATCH)

    def folds_glu(self, x, m):
        return m % 32 == 0

    def matmul(self, fmt, buffers, prepared, x, m, n, residual=None, norm=None, glu=False):
        nw, shift, step_scale = layout(fmt, n)
        codes = buffers["codes"]
        weight, eps = norm if norm is not None else (None, 0.0)
        return scalar_gemv(x, codes if codes.is_contiguous() else codes.contiguous(), prepared[0], fmt.bits,
                           fmt.zero == "int", nw, shift, step_scale, residual, fmt.tiled(m), weight, float(eps), glu)


register(ScalarGroups.name, ScalarCuda())
