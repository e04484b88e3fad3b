"""The E8P code: exact nearest codeword and the 16-bit code word, for vectors of 8 weights.

Code word layout (16 bits): bits 0–7 index the absolute-value table, bits 8–14 are the signs of
coordinates 0–6 (1 = negative), bit 15 is the shift (1: +1/4, 0: −1/4). The sign of coordinate 7
is implied: the one that makes Σ(s ⊙ σ) even.

Nearest search (exact): for each shift, y = x ∓ 1/4; for every table entry s the best signs are
sign(y), and if their parity is wrong the cheapest fix flips the coordinate with the smallest
|y_i|·s_i. So score(s) = ⟨|y|, s⟩ − [parity wrong]·2·min_i |y_i| s_i and the nearest codeword maximises
2·score(s) − ‖s‖². Cost per shift: two (N × 8)·(8 × 256) products, a top-8, and the parity fix priced
for those 8 entries only (all 256 for the rare rows where that cannot decide; see `_best_entry`).
"""

from __future__ import annotations

import torch

from ..formats.lattice import e8p_abs_table, e8p_decode, entry_parity

_CHUNK = {"cpu": 8192, "cuda": 1 << 17}  # rows per pass: (rows, 256) intermediates, cache- or launch-bound


def _table(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    s = e8p_abs_table().to(device=device, dtype=dtype)
    return s, (s * s).sum(1)


def e8p_nearest(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., 8) -> (int64 codes (...), nearest codewords (..., 8)), exact, in x's dtype."""
    shape = x.shape[:-1]
    flat = x.reshape(-1, 8)
    codes = torch.empty(flat.shape[0], dtype=torch.int64, device=x.device)
    chunk = _CHUNK.get(x.device.type, 8192)
    for i in range(0, flat.shape[0], chunk):
        codes[i : i + chunk] = _nearest_chunk(flat[i : i + chunk])
    return codes.view(shape), e8p_decode(codes, x.dtype).view(*shape, 8)


_TOP = 8  # candidates whose parity fix is priced exactly; a row falls back to all 256 when needed


def _best_entry(a: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For y = ±a (signs `neg`), the table entry maximising 2·score − ‖s‖² with its parity fix.

    Without a fix the value of entry j is v0_j = 2⟨a, s_j⟩ − ‖s_j‖²; an entry of the wrong parity loses
    4·min_i a_i s_ji. The fix is priced for the best even entry and the top `_TOP` entries by v0 only:
    every other entry is worth at most the smallest of those v0, so when the winner beats it the
    answer is exact, and the few rows where it does not are priced over all 256 entries.
    -> (value, entry, fix needed, coordinate to flip).
    """
    s, s_norm = _table(a.dtype, a.device)
    value0 = 2 * (a @ s.T) - s_norm[None, :]  # (N, 256)
    # Σ_i s_i σ_i = (Σ 2s_i − 2·Σ_neg 2s_i)/2 and every 2s_i is odd, so its parity is the entry's own
    # parity of Σ 2s_i / 2 flipped by the parity of the number of negative coordinates
    odd = entry_parity(a.device)[None, :] ^ (neg.sum(1) % 2).bool()[:, None]
    even_v, even_j = value0.masked_fill(odd, float("-inf")).max(1)
    top_v, top_j = value0.topk(_TOP, dim=1)
    top_odd = odd.gather(1, top_j)
    cost, flip_at = (a[:, None, :] * s[top_j]).min(-1)  # (N, _TOP): the cheapest coordinate to flip
    fixed_v = top_v - 4 * cost * top_odd
    v, pick = fixed_v.max(1)
    rows = torch.arange(a.shape[0], device=a.device)
    use_top = v > even_v
    value = torch.where(use_top, v, even_v)
    entry = torch.where(use_top, top_j[rows, pick], even_j)
    fix = use_top & top_odd[rows, pick]
    flip = flip_at[rows, pick]
    unsure = (value < top_v[:, -1]).nonzero().view(-1)
    if unsure.numel():  # price every entry for these rows
        au = a[unsure]
        cost, flip_all = (au[:, None, :] * s[None, :, :]).min(-1)
        full = value0[unsure] - 4 * cost * odd[unsure]
        value[unsure], entry[unsure] = full.max(1)
        fix[unsure] = odd[unsure, entry[unsure]]
        flip[unsure] = flip_all[torch.arange(unsure.numel(), device=a.device), entry[unsure]]
    return value, entry, fix, flip


def _nearest_chunk(x: torch.Tensor) -> torch.Tensor:
    best_score, best_code = None, None
    rows = torch.arange(x.shape[0], device=x.device)
    for shift_bit, shift in ((1, 0.25), (0, -0.25)):
        y = x - shift
        neg = y < 0
        value, entry, fix, flip = _best_entry(y.abs(), neg)
        signs = neg.clone()
        signs[rows[fix], flip[fix]] ^= True
        code = entry | (signs[:, :7].to(torch.int64) << torch.arange(8, 15, device=x.device)).sum(1) | (shift_bit << 15)
        # the quantity maximised differs from −distance only by ‖y‖², which depends on the shift
        dist = (y * y).sum(1) - value
        if best_score is None:
            best_score, best_code = dist, code
        else:
            better = dist < best_score
            best_score = torch.where(better, dist, best_score)
            best_code = torch.where(better, code, best_code)
    return best_code
