"""CUDA backend for `E8PStages`: the decode GEMV of `cuda/e8p_gemv.cu` for batch 1–16.

The kernel decodes a code through two 256-word tables built here from the lattice definitions
(`field_tables`), whose meaning `decode_fields` spells out in PyTorch: the tests check it against
`lattice.e8p_decode` on all 65,536 codes, so the tables the GPU reads are verified without a GPU.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..formats import E8PStages
from ..formats.lattice import e8_one_bit_points, e8p_abs_table, entry_parity
from . import nvrtc
from .backends import MAX_DECODE_BATCH, GemvBackend, register
from .tuning import launch_shape

SOURCE, ENTRY = "e8p_gemv.cu", "harpq_e8p_gemv"
#: nibble of the table word that holds coordinate j: fields (v0, v2, v4, v6 | v1, v3, v5, v7), so that the
#: pairs taken from nibbles (k, k + 4) are (v0, v1), (v2, v3), (v4, v5), (v6, v7)
NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)
STAGE2 = {None: 0, "e8": 1, "e8p": 2}


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@functools.cache
def field_tables() -> torch.Tensor:
    """(512,) int32: 256 magnitude words (by code byte 0), then 256 sign words (by code byte 1).

    A field is 4 bits n = 2k + b with 2·w = n − 7.5: k = (7 + 2σ|v|)/2, b the shift bit. Magnitude words
    hold 2k for σ = + (the eighth coordinate negated when the entry's parity is odd); sign words hold 14
    (k -> 7 − k under xor) in the fields of negative coordinates, the eighth sign being the parity of the
    seven stored ones, and b in bit 0 of every field."""
    k = ((7 + 2 * e8p_abs_table()) / 2).round().to(torch.int64)  # (256, 8)
    k[:, 7] = torch.where(entry_parity(torch.device("cpu")), 7 - k[:, 7], k[:, 7])
    shift = 4 * torch.tensor(NIBBLE, dtype=torch.int64)
    mag = ((2 * k) << shift).sum(1)
    byte = torch.arange(256, dtype=torch.int64)
    signs = (byte[:, None] >> torch.arange(7)) & 1  # (256, 7)
    negative = torch.cat([signs, signs.sum(1, keepdim=True) % 2], dim=1)  # eighth: parity of the seven
    sgn = ((14 * negative) << shift).sum(1) | ((byte >> 7) * 0x11111111)
    return _to_int32(torch.cat([mag, sgn]))


@functools.cache
def e8_field_table() -> torch.Tensor:
    """(256,) int32: the 256 points of the 1-bit E8 codebook as fields n = 2v + 8 (v = n/2 − 4)."""
    n = (2 * e8_one_bit_points() + 8).round().to(torch.int64)
    return _to_int32((n << (4 * torch.tensor(NIBBLE, dtype=torch.int64))).sum(1))


def _fields(words: torch.Tensor) -> torch.Tensor:
    """The eight 4-bit fields of table words (...), coordinate order."""
    return (words[..., None] >> (4 * torch.tensor(NIBBLE))) & 0xF


def decode_fields(codes: torch.Tensor) -> torch.Tensor:
    """What the kernel computes for 16-bit E8P codes (...), in PyTorch: codewords (..., 8) float32."""
    tables = field_tables().to(torch.int64) & 0xFFFFFFFF
    c = codes.to(torch.int64) & 0xFFFF
    return (_fields(tables[c & 0xFF] ^ tables[256 + (c >> 8)]).float() - 7.5) / 2


def decode_e8_fields(codes: torch.Tensor) -> torch.Tensor:
    """What the kernel computes for 8-bit 1-bit-E8 codes (...): points (..., 8) float32."""
    table = e8_field_table().to(torch.int64) & 0xFFFFFFFF
    return _fields(table[codes.to(torch.int64) & 0xFF]).float() / 2 - 4


def device_tables(stage2: str | None, device: torch.device) -> torch.Tensor:
    t = field_tables() if stage2 != "e8" else torch.cat([field_tables(), e8_field_table()])
    return _device_copy(t, device)


@functools.cache
def _device_copy(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device)


def layout(n: int, batch: int = 1) -> int | None:
    """Code words (pairs of codes) per thread and step for in_features n, or None. From batch 9 on (two
    n-tiles) two words: four need about 180 registers with the E8P residual stage."""
    return next((nw for nw in ((2, 1) if batch > 8 else (4, 2, 1)) if n % (64 * nw) == 0), None)


def defines(stage2: int, nw: int, m: int, n: int, batch: int, device_index: int = 0,
            tiled: bool = False) -> tuple[tuple[str, int], ...]:
    words = nw * (2 if stage2 == 2 else 1)  # 32-bit words a step loads per row (stage-one + stage-two codes)
    config = {"STAGE2": stage2, "NW": nw, "TILED": int(tiled),
              **launch_shape(m, n // (64 * nw), words, batch, device_index, in_flight=8, xearly_many=1)}
    return tuple(sorted(config.items()))


@torch.library.custom_op("harpq::e8p_gemv", mutates_args=())
def e8p_gemv(x: torch.Tensor, codes: torch.Tensor, codes2: torch.Tensor | None, tables: torch.Tensor,
             scale: torch.Tensor, stage2: int, resid_inv: float, residual: torch.Tensor | None = None,
             tiled: bool = False) -> torch.Tensor:
    """x (B, n) fp16, codes (m, n/8) int16 [, codes2 (m, n/8)] (rows or, `tiled`, row-tiled), scale (1, 1)
    fp16, or (m, 1) for matrices stacked with a scale each [, residual (B, m) fp16] -> scale · x · Ŵᵀ
    (+ residual) (B, m)."""
    if x.data_ptr() % 16 or not x.is_contiguous():
        x = x.contiguous().clone()
    batch, n = x.shape
    m = codes.shape[0]
    y = torch.empty(batch, m, dtype=torch.float16, device=x.device)
    d = dict(defines(stage2, layout(n, batch), m, n, batch, x.device.index or 0, tiled))
    kern = nvrtc.kernel(SOURCE, ENTRY, tuple(sorted(d.items())), x.device.index or 0)
    r = int(np.array([resid_inv], dtype=np.float16).view(np.uint16)[0])
    # the tail split measured slower for E8P (its parts each fill the code tables): off unless asked
    grid, split = nvrtc.gemv_split(kern, -(-m // (16 * d["MT"])), d["WARPS"] * 32, n // (64 * d["NW"]), default=False)
    nvrtc.launch(kern, grid, d["WARPS"] * 32, nvrtc.ptr(x), np.int32(batch), nvrtc.ptr(codes),
                 nvrtc.ptr(codes2), nvrtc.ptr(tables), nvrtc.ptr(scale),
                 np.int32(scale.numel() > 1), np.uint32(r * 0x10001), nvrtc.ptr(y),
                 nvrtc.ptr(nvrtc.residual_arg(residual, batch, m)), np.int32(m), np.int32(n), *split)
    return y


@e8p_gemv.register_fake
def _(x, codes, codes2, tables, scale, stage2, resid_inv, residual=None, tiled=False):
    return x.new_empty(x.shape[0], codes.shape[0])


class E8PCuda(GemvBackend):
    name = "cuda"

    def unusable(self, fmt, x, m, n):
        why = nvrtc.decode_unusable(x, MAX_DECODE_BATCH)
        if why is None and layout(n) is None:
            why = f"in_features {n} not a multiple of 64"
        return why

    def prepare(self, fmt, buffers, m, n):
        return (device_tables(fmt.stage2, buffers["codes"].device),)

    def matmul(self, fmt, buffers, prepared, x, m, n, residual=None):
        codes2 = buffers.get("codes2")
        return e8p_gemv(x, buffers["codes"].contiguous(), None if codes2 is None else codes2.contiguous(),
                        prepared[0], buffers["scales"], STAGE2[fmt.stage2], 1.0 / fmt.resid if fmt.resid else 0.0,
                        residual, fmt.tiled(m))


register(E8PStages.name, E8PCuda())
