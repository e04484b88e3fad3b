"""Searching the bitshift trellis (QTIP): the walk of least squared error for a sequence of weights.

The trellis, its codes and its bitstreams are the storage format's (`formats.trellis`). Viterbi finds the
walk of least squared error in O(2^L · T) (`viterbi`); tail-biting walks (exactly k·T bits) come from QTIP's
two Viterbi passes (`quantize_tail_biting`, §3.2 Alg. 4).

Reference: `../shared/docs/reference/quip_family.md` §4.
"""

from __future__ import annotations

import torch

from ..errors import HarpqError
from ..formats.trellis import _check


def viterbi(x: torch.Tensor, values: torch.Tensor, L: int, k: int, start_high: torch.Tensor | None = None,
            end_low: torch.Tensor | None = None) -> torch.Tensor:
    """The walk of least squared error for each sequence: states (S, T) int64.

    x (S, T) against values (2^L,), one weight per state; or x (S, T, V) against values (2^L, V), V weights
    per state (HYB: V = 2). k: the bits each step shifts in (k·V for a code of k bits per weight).
    start_high / end_low (S,): where given, the first state's high L − k bits and the last state's low
    L − k bits are pinned to them (the tail-biting constraint).

    A state j's predecessors are (c << (L − k)) | (j >> k), c < 2^k: the best of them depends on j >> k
    alone, so a step takes one minimum over (S, 2^k, 2^(L − k)) and keeps its 2^(L − k) choices per
    sequence as back-pointers (not one per state). Costs leave out Σ x², the same for every walk of a
    sequence: a step adds ‖v‖² − 2⟨x, v⟩, one addmm."""
    _check(L, k)
    xs = x.float() if x.dim() == 3 else x.float()[..., None]
    s, t, _ = xs.shape
    n, low = 1 << L, 1 << (L - k)
    vals = values.to(x.device, torch.float32).reshape(n, -1)
    norms = vals.pow(2).sum(1)
    states = torch.arange(n, device=x.device)
    inf = torch.tensor(float("inf"), device=x.device)
    cost = torch.addmm(norms, xs[:, 0], vals.T, alpha=-2)
    if start_high is not None:
        cost = torch.where((states >> k)[None, :] == start_high[:, None], cost, inf)
    back = torch.empty(t, s, low, dtype=torch.uint8 if k <= 8 else torch.int32, device=x.device)
    for i in range(1, t):
        best, c = cost.view(s, 1 << k, low).min(dim=1)
        back[i] = c
        cost = torch.addmm(norms, xs[:, i], vals.T, alpha=-2).view(s, low, 1 << k).add_(best[:, :, None]).view(s, n)
    if end_low is not None:
        cost = torch.where((states & (low - 1))[None, :] == end_low[:, None], cost, inf)
    walk = torch.empty(s, t, dtype=torch.int64, device=x.device)
    walk[:, -1] = cost.argmin(dim=1)
    for i in range(t - 1, 0, -1):
        c = back[i].gather(1, (walk[:, i:i + 1] >> k)).squeeze(1).to(torch.int64)
        walk[:, i - 1] = (c << (L - k)) | (walk[:, i] >> k)
    return walk


def quantize_tail_biting(x: torch.Tensor, values: torch.Tensor, L: int, k: int) -> torch.Tensor:
    """A tail-biting walk (S, T) for x (S, T) or (S, T, V) by QTIP's approximation: Viterbi on x rotated by
    T/2 reads the L − k bits the seam (last → first step) should share, then Viterbi on x with both ends
    pinned."""
    t = x.shape[1]
    if t < 2:
        raise HarpqError(f"a tail-biting sequence needs at least 2 steps, not {t}")
    seam = viterbi(torch.roll(x, t // 2, dims=1), values, L, k)[:, t // 2]  # the state of x's first step
    shared = seam >> k
    return viterbi(x, values, L, k, start_high=shared, end_low=shared)
