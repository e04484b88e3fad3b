"""The E8P code: exact nearest codeword and the 16-bit code word, for vectors of 8 weights.

Code word layout (16 bits): bits 0–7 index the absolute-value table, bits 8–14 are the signs of
coordinates 0–6 (1 = negative), bit 15 is the shift (1: +1/4, 0: −1/4). The sign of coordinate 7
is implied: the one that makes Σ(s ⊙ σ) even.

Nearest search (exact): for each shift, y = x ∓ 1/4; for every table entry s the best signs are
sign(y), and if their parity is wrong the cheapest fix flips the coordinate with the smallest
|y_i|·s_i. So score(s) = ⟨|y|, s⟩ − [parity wrong]·2·min_i |y_i| s_i and the nearest codeword maximises
2·score(s) − ‖s‖². Cost: one (N × 8)·(8 × 256) product and an (N, 256, 8) minimum per shift.
"""

from __future__ import annotations

import torch

from .lattice import e8p_abs_table

_CHUNK = 8192


def _table(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    s = e8p_abs_table().to(device=device, dtype=dtype)
    return s, (s * s).sum(1)


def e8p_nearest(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., 8) -> (int64 codes (...), nearest codewords (..., 8)), exact, in x's dtype."""
    shape = x.shape[:-1]
    flat = x.reshape(-1, 8)
    codes = torch.empty(flat.shape[0], dtype=torch.int64, device=x.device)
    for i in range(0, flat.shape[0], _CHUNK):
        codes[i : i + _CHUNK] = _nearest_chunk(flat[i : i + _CHUNK])
    return codes.view(shape), e8p_decode(codes, x.dtype).view(*shape, 8)


def _nearest_chunk(x: torch.Tensor) -> torch.Tensor:
    s, s_norm = _table(x.dtype, x.device)
    twice = (2 * s).round().to(torch.int64)  # 2|s_i|: odd integers 1, 3, 5
    best_score, best_code = None, None
    for shift_bit, shift in ((1, 0.25), (0, -0.25)):
        y = x - shift
        neg = y < 0
        a = y.abs()
        score = a @ s.T  # (N, 256)
        # parity of Σ s_i σ_i: with σ_i = −1 on `neg`, Σ 2 s_i σ_i ≡ Σ 2 s_i − 2·Σ_neg 2 s_i; parity via mod 4
        negated = (neg.to(x.dtype) @ twice.T.to(x.dtype)).round().to(torch.int64)  # small integers: exact
        total = twice.sum(1)[None, :] - 2 * negated
        odd = (total % 4) != 0  # Σ s_i σ_i is odd
        cost, flip_at = (a[:, None, :] * s[None, :, :]).min(-1)  # cheapest coordinate to flip, per entry
        score = score - odd * 2 * cost
        value = 2 * score - s_norm[None, :]
        v, idx = value.max(1)
        signs = neg.clone()
        rows = torch.arange(x.shape[0], device=x.device)
        fix = odd[rows, idx]
        flip = flip_at[rows, idx]
        signs[rows[fix], flip[fix]] ^= True
        code = idx | (signs[:, :7].to(torch.int64) << torch.arange(8, 15, device=x.device)).sum(1) | (shift_bit << 15)
        # the quantity maximised differs from −distance only by ‖y‖², which depends on the shift
        dist = (y * y).sum(1) - v
        if best_score is None:
            best_score, best_code = dist, code
        else:
            better = dist < best_score
            best_score = torch.where(better, dist, best_score)
            best_code = torch.where(better, code, best_code)
    return best_code


def e8p_decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int codes (...) -> codewords (..., 8)."""
    c = codes.to(torch.int64) & 0xFFFF
    s, _ = _table(dtype, codes.device)
    mag = s[c & 0xFF]  # (..., 8)
    bits = (c[..., None] >> torch.arange(8, 15, device=c.device)) & 1  # signs of coords 0..6
    twice = (2 * mag).round().to(torch.int64)
    partial = (twice[..., :7] * (1 - 2 * bits)).sum(-1)  # Σ_{i<7} 2 s_i σ_i
    # choose σ_7 so that Σ 2 s_i σ_i ≡ 0 (mod 4)
    last_neg = ((partial + twice[..., 7]) % 4) != 0
    sign = torch.cat([1 - 2 * bits, (1 - 2 * last_neg.to(torch.int64))[..., None]], dim=-1).to(dtype)
    shift = torch.where(((c >> 15) & 1).bool(), 0.25, -0.25).to(dtype)
    return mag * sign + shift[..., None]
