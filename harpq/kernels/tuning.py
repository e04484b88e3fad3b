"""Launch shapes of the decode GEMVs (`cuda/gemv_common.cuh`'s driver), chosen per call from the shape.

MT: m-tiles of 16 rows per warp (two share each activation fragment: halves activation traffic, which
dominates from batch 5 on). NT: n-tiles of 8 batch rows. WARPS: warps splitting K in a block. UNROLL:
steps whose loads go out together. With more row tiles than two per SM, blocks of 4 warps with about 4
words of codes per row in flight were fastest for scalar grids on the H200, 8 for E8P
(`benchmarks/gemv_speed.py --sweep`, Llama-2-7B shapes); with fewer, 8 warps with about 8 words.
`OVERRIDE` lets a benchmark sweep them.
"""

from __future__ import annotations

import functools

import torch

OVERRIDE: dict[str, int] = {}


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_shape(m: int, steps: int, words_per_row: int, batch: int, device_index: int = 0,
                 in_flight: int = 4) -> dict[str, int]:
    """steps: K-steps of a row tile; words_per_row: 32-bit words one step loads per row and thread;
    in_flight: words per row a warp should have in flight with many row tiles (the format's decode cost
    decides: more for E8P, whose decode takes longer)."""
    nt = 1 if batch <= 8 else 2
    mt = 1 if batch <= 4 else 2
    tiles = -(-m // (16 * mt))
    if tiles > 2 * _sm_count(device_index) or steps < 8:
        warps, unroll = 4, max(1, in_flight // (mt * words_per_row))
    else:
        warps, unroll = 8, max(1, 8 // (mt * words_per_row))
    return {"MT": mt, "NT": nt, "WARPS": warps, "UNROLL": unroll, "XEARLY": 1, **OVERRIDE}
