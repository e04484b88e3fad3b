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


def launch_shape(m: int, steps: int, words_per_row: int, batch: int, device_index: int = 0,
                 in_flight: int = 4, xearly_many: int = 1) -> dict[str, int]:
    """steps: K-steps of a row tile; words_per_row: 32-bit words one step loads per row and thread;
    in_flight: words per row a warp should have in flight with many row tiles; xearly_many: XEARLY then
    (the sweep preferred it for E8P, not for scalar grids)."""
    nt = 1 if batch <= 8 else 2
    xearly = 1 if nt == 1 else 0  # with two n-tiles the early activations cost too many registers
    if m > 2 * _sm_count(device_index) * 16:
        mt = 2 if batch > 4 or words_per_row < 4 or in_flight > 4 else 1
        warps, unroll = 4, max(1, in_flight // (mt * words_per_row))
        xearly = xearly and xearly_many
    else:
        mt, warps = (1 if batch <= 4 else 2), (8 if steps >= 8 else 4)
        unroll = 2 if mt * words_per_row <= 4 else 1
    return {"MT": mt, "NT": nt, "WARPS": warps, "UNROLL": unroll, "XEARLY": xearly, **OVERRIDE}
