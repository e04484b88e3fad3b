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
import math
import os

import torch

OVERRIDE: dict[str, int] = {}
#: the tail split (`cuda/gemv_common.cuh`, TailSplit); HARPQ_TAIL_SPLIT=0 or OVERRIDE["TAIL_SPLIT"] = 0 turns it off
TAIL_SPLIT = os.environ.get("HARPQ_TAIL_SPLIT", "1") != "0"


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
                 paired: bool = False, norm: bool = False) -> dict[str, int]:
    """steps: K-steps of a row tile; words_per_row: 32-bit words one step loads per row and thread;
    in_flight: words per row a warp should have in flight with many row tiles; xearly_many: XEARLY then
    (the sweep preferred it for E8P, not for scalar grids); one_wave: at batch ≤ 4 with many rows, one
    m-tile per warp and registers capped (MIN_BLOCKS) so that all blocks are resident at once, where
    that takes at most 8 blocks per SM (the ncu profile found these grids under one wave with the warps
    waiting on loads; measured on the H200 for the scalar grids, not for E8P); paired: two m-tiles per warp
    whatever else holds (a gate tile and its up tile, `GLU`), in blocks of two warps with many rows at batch ≤ 2,
    loading two steps ahead where the block also folds the norm (`norm`) and a step is four words (measured on
    the H200, 22016×4096: 4-bit 21.4 → 19.4 µs with the norm, 2-bit 19.0 → 17.4)."""
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
    if paired and batch <= 2 and many_row_tiles(m, device_index):
        warps, unroll = 2, (2 if norm and words_per_row >= 4 else 1)
        extra.pop("MIN_BLOCKS", None)
    return {"MT": mt, "NT": nt, "WARPS": warps, "UNROLL": unroll, "XEARLY": xearly, **extra, **OVERRIDE}


def tail_split(blocks: int, sms: int, resident: int, steps: int, warps: int, most: int = 8) -> tuple[int, int]:
    """(row blocks split along K, parts per split block) for a grid of `blocks` row blocks, or (0, 1).

    After whole rounds of one block per SM, the `blocks mod sms` left over load some SMs with a whole block
    more. Split into q parts each and launched last, they load the SM that takes the most parts with
    ⌈left·q / sms⌉ / q of a block instead: the q that minimises that (the smallest among equals), where every
    part keeps at least one step per warp and the most loaded SM can still hold all its blocks at once
    (`resident` per SM); none where one wave does not hold the grid or nothing is gained."""
    rounds, left = divmod(blocks, sms)
    if left == 0 or blocks > sms * resident:
        return 0, 1
    best, best_q = 1.0, 1
    for q in range(2, most + 1):
        per_sm = math.ceil(left * q / sms)
        if steps < q * warps or rounds + per_sm > resident:
            continue
        if per_sm / q < best - 1e-9:
            best, best_q = per_sm / q, q
    return (left, best_q) if best_q > 1 else (0, 1)
