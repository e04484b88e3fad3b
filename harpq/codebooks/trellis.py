"""Bitshift trellis codes (QTIP): a sequence of T weights as a walk on a trellis of 2^L states, k bits each.

The state is an L-bit window of a bitstream: each step shifts k new bits in at the bottom (V = 1), so the
walk *is* the bitstream (nothing else is stored) and state t is its bits [t·k, t·k + L). A state decodes to
its value by a computed code, a hash of the state that needs no table (1MAD, 3INST; QTIP §3.1), so a
decoder spends a few instructions per weight. Viterbi finds the walk of least squared error in
O(2^L · T) (`viterbi`). A free walk stores L + (T − 1)·k bits; tail-biting (the last state's low L − k bits
are the first state's high ones: the bitstream is a cycle) stores exactly k·T, found with QTIP's two
Viterbi passes (`quantize_tail_biting`, §3.2 Alg. 4).

Reference: `../shared/docs/reference/quip_family.md` §4.
"""

from __future__ import annotations

import torch

from ..errors import HarpqError

#: the computed codes: (multiplier, increment) of the 32-bit LCG hash each applies to the state
LCG = {"1mad": (34038481, 76625530), "3inst": (89226354, 64248484)}
CODES = tuple(LCG)
_MASK32 = (1 << 32) - 1


def _hash(states: torch.Tensor, code: str) -> torch.Tensor:
    a, b = LCG[code]
    return (states.to(torch.int64) * a + b) & _MASK32


def code_values(code: str, L: int = 16) -> torch.Tensor:
    """The value of every state 0 … 2^L − 1 (float32), unscaled.

    1MAD: the four bytes of the hash summed, (sum − 510)/147.8 (a sum of four uniform bytes: ≈ N(0, 1)).
    3INST: each 16-bit half of the hash keeps its sign and low 12 bits (mantissa and the two low exponent
    bits), xor 0x3B60 (fp16 0.922), read as fp16; the two halves summed."""
    if code not in LCG:
        raise HarpqError(f"unknown trellis code {code!r} (offered: {', '.join(CODES)})")
    x = _hash(torch.arange(1 << L), code)
    if code == "1mad":
        total = (x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + ((x >> 24) & 0xFF)
        return ((total.double() - 510) / 147.8).float()
    halves = torch.stack([x & 0xFFFF, x >> 16], dim=-1)
    halves = (halves & 0x8FFF) ^ 0x3B60
    signed = torch.where(halves >= 1 << 15, halves - (1 << 16), halves).to(torch.int16)  # the same 16 bits
    return signed.view(torch.float16).float().sum(-1)


def _check(L: int, k: int) -> None:
    if not (1 <= k < L <= 24):
        raise HarpqError(f"a bitshift trellis needs 1 ≤ k < L ≤ 24 (got L = {L}, k = {k})")


def viterbi(x: torch.Tensor, values: torch.Tensor, L: int, k: int, start_high: torch.Tensor | None = None,
            end_low: torch.Tensor | None = None) -> torch.Tensor:
    """The walk of least squared error for each sequence of x (S, T): states (S, T) int64.

    start_high / end_low (S,): where given, the first state's high L − k bits and the last state's low
    L − k bits are pinned to them (the tail-biting constraint)."""
    _check(L, k)
    s, t = x.shape
    n, low = 1 << L, 1 << (L - k)
    vals = values.to(x.device, torch.float32)
    states = torch.arange(n, device=x.device)
    inf = torch.tensor(float("inf"), device=x.device)
    cost = (x[:, :1].float() - vals) ** 2
    if start_high is not None:
        cost = torch.where((states >> k)[None, :] == start_high[:, None], cost, inf)
    back = torch.empty(t, s, n, dtype=torch.uint8 if k <= 8 else torch.int32, device=x.device)
    for i in range(1, t):
        # the predecessors of state j are (c << (L − k)) | (j >> k), c < 2^k: view cost as (S, 2^k, 2^(L − k))
        best, c = cost.view(s, 1 << k, low).min(dim=1)
        back[i] = c.repeat_interleave(1 << k, dim=1).to(back.dtype)
        cost = best.repeat_interleave(1 << k, dim=1) + (x[:, i:i + 1].float() - vals) ** 2
    if end_low is not None:
        cost = torch.where((states & (low - 1))[None, :] == end_low[:, None], cost, inf)
    walk = torch.empty(s, t, dtype=torch.int64, device=x.device)
    walk[:, -1] = cost.argmin(dim=1)
    for i in range(t - 1, 0, -1):
        c = back[i].gather(1, walk[:, i:i + 1]).squeeze(1).to(torch.int64)
        walk[:, i - 1] = (c << (L - k)) | (walk[:, i] >> k)
    return walk


def quantize_tail_biting(x: torch.Tensor, values: torch.Tensor, L: int, k: int) -> torch.Tensor:
    """A tail-biting walk (S, T) for x (S, T) by QTIP's approximation: Viterbi on x rotated by T/2 reads
    the L − k bits the seam (last → first weight) should share, then Viterbi on x with both ends pinned."""
    t = x.shape[1]
    if t < 2:
        raise HarpqError(f"a tail-biting sequence needs at least 2 weights, not {t}")
    seam = viterbi(torch.roll(x, t // 2, dims=1), values, L, k)[:, t // 2]  # the state of x's first weight
    shared = seam >> k
    return viterbi(x, values, L, k, start_high=shared, end_low=shared)


def pack(walk: torch.Tensor, L: int, k: int, tail_biting: bool = True) -> torch.Tensor:
    """The bitstream (S, bits) bool of walks (S, T), most significant bit first: the first state's L bits,
    then k per further state; tail-biting drops the last L − k (they repeat the first state's): k·T bits."""
    _check(L, k)
    s, t = walk.shape
    first = (walk[:, :1] >> torch.arange(L - 1, -1, -1, device=walk.device)) & 1
    steps = (walk[:, 1:, None] >> torch.arange(k - 1, -1, -1, device=walk.device)) & 1
    bits = torch.cat([first, steps.reshape(s, -1)], dim=1).bool()
    if tail_biting:
        wrapped = (walk[:, -1] & ((1 << (L - k)) - 1)) == (walk[:, 0] >> k)
        if not bool(wrapped.all()):
            raise HarpqError("a walk that does not bite its tail cannot be stored in k·T bits")
        bits = bits[:, : k * t]
    return bits


def unpack(bits: torch.Tensor, L: int, k: int, t: int, tail_biting: bool = True) -> torch.Tensor:
    """Walks (S, T) from bitstreams `pack` wrote."""
    _check(L, k)
    want = k * t if tail_biting else L + (t - 1) * k
    if bits.shape[1] != want:
        raise HarpqError(f"a {'tail-biting ' if tail_biting else ''}walk of {t} states has {want} bits, "
                         f"not {bits.shape[1]}")
    stream = torch.cat([bits, bits[:, : L - k]], dim=1) if tail_biting else bits
    weights = 1 << torch.arange(L - 1, -1, -1, device=bits.device)
    starts = torch.arange(t, device=bits.device) * k
    windows = stream.long()[:, starts[:, None] + torch.arange(L, device=bits.device)[None, :]]  # (S, T, L)
    return (windows * weights).sum(-1)
