"""Launch shapes of the decode GEMVs (`cuda/gemv_common.cuh`'s driver), chosen per call from the shape.

MT: m-tiles of 16 rows per warp (two share each activation fragment). NT: n-tiles of 8 batch rows. WARPS:
warps splitting K in a block. UNROLL: steps whose loads go out together. XEARLY: a step's activation
loads issued together. Chosen from a sweep on the H200 (`benchmarks/gemv_speed.py --sweep`, batch 1,
Llama-2-7B shapes, results in benchmarks/RESULTS.md): with more rows than two 16-row tiles per SM, blocks
of 4 warps loading one step ahead, two m-tiles except for 4-word scalar steps at batch ≤ 4; with fewer,
8 warps, one m-tile (two from batch 5 on).
`OVERRIDE` lets a benchmark sweep them.
"""

from __future__ import annotations

import functools

import torch

OVERRIDE: dict[str, int] = {}


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def many_row_tiles(m: int, device_index: int = 0) -> bool:
    """More 16-row tiles than two per SM: the regime of the large matrices' launch shapes."""
    return m > 2 * _sm_count(device_index) * 16


@functools.cache
def tma_capable(device_index: int) -> bool:
    """Hopper on: the bulk copies (`cp.async.bulk`) of the TMA ring exist."""
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def ring_pays(m: int, steps: int, batch: int, device_index: int = 0) -> bool:
    """Whether the scalar GEMV takes its weights through the TMA ring (BULK): measured faster on the H200 at
    batch 1 for matrices of few row tiles and long rows (4096×11008, 4-bit: 11.2–11.3 µs against 12.5), slower
    for many row tiles (12288×4096: 13.5 against 12.2), at batch 4 and 16, and about equal on 4096×4096."""
    return batch == 1 and not many_row_tiles(m, device_index) and steps >= 64


def launch_shape(m: int, steps: int, words_per_row: int, batch: int, device_index: int = 0,
                 in_flight: int = 4, xearly_many: int = 1, one_wave: bool = False,
                 paired: bool = False) -> dict[str, int]:
    """steps: K-steps of a row tile; words_per_row: 32-bit words one step loads per row and thread;
    in_flight: words per row a warp should have in flight with many row tiles; xearly_many: XEARLY then
    (the sweep preferred it for E8P, not for scalar grids); one_wave: at batch ≤ 4 with many rows, one
    m-tile per warp and registers capped (MIN_BLOCKS) so that all blocks are resident at once, where
    that takes at most 8 blocks per SM (the ncu profile found these grids under one wave with the warps
    waiting on loads; measured on the H200 for the scalar grids, not for E8P); paired: two m-tiles per warp
    whatever else holds (a gate tile and its up tile, `GLU`)."""
    nt = 1 if batch <= 8 else 2
    xearly = 1 if nt == 1 else 0  # with two n-tiles the early activations cost too many registers
    sms = _sm_count(device_index)
    extra = {}
    if many_row_tiles(m, device_index):
        mt = 2 if batch > 4 or words_per_row < 4 or in_flight > 4 else 1
        per_sm = -(-m // (16 * sms))  # blocks per SM with one m-tile
        warps, unroll = 4, max(1, in_flight // (mt * words_per_row))
        if one_wave and batch <= 4 and per_sm <= 8:  # capped registers leave no room for a second step
            mt, unroll, extra = 1, 1, {"MIN_BLOCKS": per_sm}
        xearly = xearly and xearly_many
    else:
        mt, warps = (1 if batch <= 4 else 2), (8 if steps >= 8 else 4)
        unroll = 2 if mt * words_per_row <= 4 and words_per_row != 3 else 1  # 3-bit: slower at two (H200)
    if paired and mt == 1:
        mt, unroll = 2, max(1, unroll // 2)
        if "MIN_BLOCKS" in extra:
            extra["MIN_BLOCKS"] = max(2, -(-extra["MIN_BLOCKS"] // 2))
    return {"MT": mt, "NT": nt, "WARPS": warps, "UNROLL": unroll, "XEARLY": xearly, **extra, **OVERRIDE}
