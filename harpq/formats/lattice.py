"""E8-lattice point sets for QuIP#'s codebooks, built from first principles.

E8P (2 bits/weight, 16 bits per 8 weights): codewords s ⊙ σ + ε/4 with s one of 256 absolute-value
vectors of D̂8 = {x ∈ (Z + ½)^8 : Σx even}, σ a sign pattern keeping Σ(s ⊙ σ) even (7 free bits), ε = ±1.
The 256 are the 227 vectors with ‖s‖² ≤ 10 and 29 of the 56 with ‖s‖² = 12 made of five 3/2 and three
1/2 (QuIP# pads with 29 such vectors; which 29 only matters for bit-compatibility with their files, so
harpq takes the first 29 in lexicographic order of the positions of the 1/2 entries).

The 16-bit E8P code word: bits 0–7 index the absolute-value table, bits 8–14 are the signs of
coordinates 0–6 (1 = negative), bit 15 is the shift (1: +1/4, 0: −1/4); the sign of coordinate 7 is
implied: the one that makes Σ(s ⊙ σ) even.

E8-1bit (the second stage of 3-bit RVQ): 256 points of E8: the origin, the 240 roots and 15 of the 16
vectors ±2e_i (−2e_8 dropped).
"""

from __future__ import annotations

import itertools
from functools import cache

import torch


@cache
def e8p_abs_table() -> torch.Tensor:
    """(256, 8) float64: the absolute-value source vectors, ordered by norm, then lexicographically."""
    small = []
    for levels in itertools.product((0.5, 1.5, 2.5), repeat=8):
        if sum(v * v for v in levels) <= 10:
            small.append(levels)
    small.sort(key=lambda s: (sum(v * v for v in s), s))
    padding = []
    for halves in itertools.combinations(range(8), 3):
        padding.append(tuple(0.5 if i in halves else 1.5 for i in range(8)))
    table = small + padding[:29]
    assert len(small) == 227 and len(table) == 256
    return torch.tensor(table, dtype=torch.float64)


@cache
def e8_one_bit_points() -> torch.Tensor:
    """(256, 8) float64: origin, the 240 roots of E8, and ±2e_i except −2e_8."""
    pts = [(0.0,) * 8]
    for i, j in itertools.combinations(range(8), 2):
        for si, sj in itertools.product((1.0, -1.0), repeat=2):
            v = [0.0] * 8
            v[i], v[j] = si, sj
            pts.append(tuple(v))
    for signs in itertools.product((0.5, -0.5), repeat=8):
        if sum(1 for s in signs if s < 0) % 2 == 0:
            pts.append(signs)
    for i in range(8):
        for s in (2.0, -2.0):
            if not (i == 7 and s < 0):
                v = [0.0] * 8
                v[i] = s
                pts.append(tuple(v))
    assert len(pts) == 256
    return torch.tensor(pts, dtype=torch.float64)


def e8p_all_codewords() -> torch.Tensor:
    """All 2^16 E8P codewords in code order (for tests and brute-force references)."""
    return e8p_decode(torch.arange(1 << 16, dtype=torch.int64), torch.float64)


_PARITY: dict[torch.device, torch.Tensor] = {}


def entry_parity(device: torch.device) -> torch.Tensor:
    """(256,) bool: Σ 2|s_i| / 2 is odd, for each absolute-value entry."""
    if device not in _PARITY:
        twice = (2 * e8p_abs_table()).round().to(torch.int64)
        _PARITY[device] = ((twice.sum(1) // 2) % 2).bool().to(device)
    return _PARITY[device]


@cache
def on_device(table: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A table of this module on a device, made once (a CUDA graph may not copy from the host)."""
    return {"abs": e8p_abs_table, "one_bit": e8_one_bit_points}[table]().to(device=device, dtype=dtype)


def e8p_decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int codes (...) -> codewords (..., 8)."""
    c = codes.to(torch.int64) & 0xFFFF
    s = on_device("abs", codes.device, dtype)
    mag = s[c & 0xFF]  # (..., 8)
    bits = (c[..., None] >> torch.arange(8, 15, device=c.device)) & 1  # signs of coords 0..6
    twice = (2 * mag).round().to(torch.int64)
    partial = (twice[..., :7] * (1 - 2 * bits)).sum(-1)  # Σ_{i<7} 2 s_i σ_i
    # choose σ_7 so that Σ 2 s_i σ_i ≡ 0 (mod 4)
    last_neg = ((partial + twice[..., 7]) % 4) != 0
    sign = torch.cat([1 - 2 * bits, (1 - 2 * last_neg.to(torch.int64))[..., None]], dim=-1).to(dtype)
    shift = torch.where(((c >> 15) & 1).bool(), 0.25, -0.25).to(dtype)
    return mag * sign + shift[..., None]

