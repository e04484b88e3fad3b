"""CUDA backend for `TrellisTiles`: the decode GEMV of `cuda/trellis_gemv.cu` for batch 1–16.

It decodes the computed codes (3INST, 1MAD) of the L = 16 trellis straight from the stored bitstreams; HYB
(a table per matrix) and other trellis lengths take the reference path. `kernel_values` spells out in
PyTorch what the kernel computes for a state (two fp16 parts, summed by the tensor cores); the tests check
it against the format's own code values for all 65,536 states, so the decode is verified without a GPU.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..formats import TrellisTiles
from ..formats.trellis import LCG, TILE, code_values
from . import nvrtc
from .backends import MAX_DECODE_BATCH, GemvBackend, register
from .tuning import launch_shape, many_row_tiles

SOURCE, ENTRY = "trellis_gemv.cu", "harpq_trellis_gemv"
CODE = {"3inst": 0, "1mad": 1}
MAGIC = 0x3B603B60  # 3INST's xor, a kernel argument (see `parts` in the source)
L = 16  # the state bits the kernel decodes


def kernel_values(code: str) -> torch.Tensor:
    """What the kernel computes for every state (2^16,), before `factor`: the fp32 sum of its two fp16 parts."""
    a, b = LCG[code]
    x = (torch.arange(1 << L, dtype=torch.int64) * a + b) & 0xFFFFFFFF
    if code == "3inst":
        words = (x & 0x8FFF8FFF) ^ MAGIC
    else:
        total = (x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + ((x >> 24) & 0xFF)
        words = total | 0xE5FE6400
    halves = torch.stack([words & 0xFFFF, words >> 16], dim=-1)
    signed = torch.where(halves >= 1 << 15, halves - (1 << 16), halves).to(torch.int16)
    return signed.view(torch.float16).float().sum(-1)


def lane_states(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The states the kernel's lanes read, in PyTorch: (tiles, 256) for codes (tiles, 8·bits) int32.

    Lane l takes word a = ⌊8k·l / 32⌋ and the next (cyclically) of its tile, shifts them left by the bit
    offset o = 8k·l mod 32, and reads state j (< 8) as bits [k·j, k·j + 16) from the top: walk position
    8l + j."""
    words = codes.to(torch.int64) & 0xFFFFFFFF
    tw = 8 * bits
    lane = torch.arange(32)
    first = 8 * bits * lane
    a, o = first // 32, first % 32
    hi, lo = words[:, a], words[:, (a + 1) % tw]  # (tiles, 32)
    hi = ((hi << o) | (lo >> (32 - o))) & 0xFFFFFFFF
    lo = (lo << o) & 0xFFFFFFFF
    top = (hi << 16) | (lo >> 16)  # the window's top 48 bits
    right = 32 - bits * torch.arange(8)  # state j's lowest bit within them
    return ((top[..., None] >> right) & 0xFFFF).reshape(codes.shape[0], 256)


@functools.cache
def factor(code: str) -> float:
    """Multiplier from the kernel's values to the format's unit-RMS values (1MAD: its 1/147.8 too)."""
    rms = float(code_values(code, L).double().pow(2).mean().sqrt())  # unit values = code values / rms
    return 1 / rms / (147.8 if code == "1mad" else 1.0)


def layout(bits: int, n: int, many_rows: bool = False) -> tuple[int, int] | None:
    """(tiles along K per step, tiles one warp-wide load covers) for in_features n, or None. Sixteen tiles
    per step where the grid has many row tiles (faster there on the H200, slower on 4096 rows), else up to 8."""
    if n % TILE:
        return None
    tiles = n // TILE
    tpl = 32 // (8 * bits)
    g = next(g for g in ((16, 8, 4, 2, 1) if many_rows else (8, 4, 2, 1)) if tiles % g == 0)
    return g, min(tpl, g)


def defines(bits: int, code: str, m: int, n: int, batch: int, device_index: int = 0) -> tuple[tuple[str, int], ...]:
    g, tpl = layout(bits, n, many_rows=many_row_tiles(m, device_index))
    # 2-bit states from pre-shifted windows: measured faster on the H200 (12288×4096, batch 1: 16.4 against 17.9 µs)
    config = {"BITS": bits, "CODE": CODE[code], "G": g, "TPL": tpl, "PRESHIFT": int(bits == 2),
              **launch_shape(m, n // (TILE * g), g // tpl, batch, device_index, in_flight=8, xearly_many=1)}
    return tuple(sorted(config.items()))


@torch.library.custom_op("harpq::trellis_gemv", mutates_args=())
def trellis_gemv(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bits: int, code: str,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, n) fp16, codes (tiles, 8·bits) int32, scale (1, 1) fp16, or (m, 1) for matrices stacked with a
    scale each [, residual (B, m) fp16] -> scale · x · Ŵᵀ (+ residual) (B, m)."""
    if x.data_ptr() % 16 or not x.is_contiguous():
        x = x.contiguous().clone()
    batch, n = x.shape
    m = codes.shape[0] * TILE * TILE // n
    y = torch.empty(batch, m, dtype=torch.float16, device=x.device)
    d = dict(defines(bits, code, m, n, batch, x.device.index or 0))
    kern = nvrtc.kernel(SOURCE, ENTRY, tuple(sorted(d.items())), x.device.index or 0)
    # the tail split measured slower for the trellis (11008×4096, 2-bit: 20.3 against 17.8 µs): off unless asked
    grid, split = nvrtc.gemv_split(kern, -(-m // (16 * d["MT"])), d["WARPS"] * 32, n // (TILE * d["G"]),
                                   default=False)
    nvrtc.launch(kern, grid, d["WARPS"] * 32, nvrtc.ptr(x), np.int32(batch), nvrtc.ptr(codes),
                 nvrtc.ptr(scale), np.int32(scale.numel() > 1), np.float32(factor(code)), nvrtc.ptr(y),
                 nvrtc.ptr(nvrtc.residual_arg(residual, batch, m)), np.int32(m), np.int32(n), np.uint32(MAGIC),
                 *split)
    return y


@trellis_gemv.register_fake
def _(x, codes, scale, bits, code, residual=None):
    return x.new_empty(x.shape[0], codes.shape[0] * TILE * TILE // x.shape[1])


class TrellisCuda(GemvBackend):
    name = "cuda"

    def unusable(self, fmt, x, m, n):
        why = nvrtc.decode_unusable(x, MAX_DECODE_BATCH)
        if why is None and fmt.code not in CODE:
            why = f"the {fmt.code} code (a table per matrix) has no kernel"
        if why is None and fmt.L != L:
            why = f"a trellis of L = {fmt.L} (the kernel decodes L = {L})"
        if why is None and layout(fmt.bits, n) is None:
            why = f"in_features {n} not a multiple of {TILE}"
        return why

    def matmul(self, fmt, buffers, prepared, x, m, n, residual=None):
        return trellis_gemv(x, buffers["codes"].contiguous(), buffers["scales"], fmt.bits, fmt.code, residual)


register(TrellisTiles.name, TrellisCuda())
