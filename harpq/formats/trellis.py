"""Storage of QTIP's trellis codes: each 16 × 16 tile of the matrix is one tail-biting bitstream of k·256 bits.

The bitshift trellis (L, k, V = 1): a state is an L-bit window of a bitstream; each step shifts k new bits in
at the bottom, so a walk *is* its bitstream (nothing else is stored) and state t is its bits [t·k, t·k + L).
A state decodes to its value by a computed code, a hash of the state that needs no table (1MAD, 3INST; QTIP
§3.1): a decoder spends a few instructions per weight. A free walk takes L + (T − 1)·k bits; a tail-biting
one (the last state's low L − k bits are the first state's high ones: the bitstream is a cycle) exactly k·T.

A tile (rows 16i … 16i + 15, columns 16j … 16j + 15) is a walk on the bitshift trellis (`codebooks.trellis`):
its bitstream, k bits per weight, is stored as 8k int32 words, most significant bit first; tiles are ordered
row-block-major (i, then j). Any bit pattern is a valid walk, so decoding needs no table beyond the computed
code of each state, times one scale per matrix. The walk visits the tile in the order of the tensor cores'
A fragment (`TILE_ORDER`): weights 8l … 8l + 7 are those lane l = 4g + t of a warp holds in
mma.m16n8k16 (rows g and g + 8, columns 4t … 4t + 3), so each lane of the decode kernel reads one
contiguous 8k-bit stretch of the bitstream (and the next lane's first 16 − k bits).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..errors import HarpqError
from .base import BufferSpec, StorageFormat

TILE = 16  # rows and columns of a tile: one trellis sequence of 256 weights

#: the computed codes: (multiplier, increment) of the 32-bit LCG hash each applies to the state
LCG = {"1mad": (34038481, 76625530), "3inst": (89226354, 64248484)}
#: codes of one weight per state computed from the state alone, and HYB: two weights per state from a table
CODES = (*LCG, "hyb")
HYB_ROWS = 9  # Q: the table has 2^Q rows of 2 values (2 KiB in fp16)
_MASK32 = (1 << 32) - 1


def values_per_state(code: str) -> int:
    return 2 if code == "hyb" else 1


def hyb_table(samples: int = 1 << 16, iterations: int = 25) -> torch.Tensor:
    """HYB's starting table (2^Q, 2): k-means centres of 2-D N(0, 1) samples (QTIP: 2^20 samples, scipy),
    scaled to unit RMS. Stored with every matrix (it is data, and QTIP tunes it per layer)."""
    gen = torch.Generator().manual_seed(0)
    pts = torch.randn(samples, 2, generator=gen, dtype=torch.float64)
    centres = pts[torch.randperm(samples, generator=gen)[: 1 << HYB_ROWS]].clone()
    for _ in range(iterations):
        nearest = torch.cdist(pts, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, nearest, pts)
        counts = torch.bincount(nearest, minlength=centres.shape[0]).clamp(min=1)[:, None]
        centres = torch.where(counts > 0, sums / counts, centres)
    return (centres / centres.pow(2).mean().sqrt()).float()


def hyb_values(table: torch.Tensor, L: int = 16) -> torch.Tensor:
    """The two values of every state (2^L, 2): hash x = s² + s (mod 2^32), row = bits 15 − Q … 14 of x,
    the first value's sign flipped by bit 15 (QTIP's HYB)."""
    x = (torch.arange(1 << L, dtype=torch.int64, device=table.device) ** 2
         + torch.arange(1 << L, device=table.device)) & _MASK32
    pairs = table.float()[(x >> (15 - HYB_ROWS)) & ((1 << HYB_ROWS) - 1)].clone()
    pairs[:, 0] = torch.where(((x >> 15) & 1).bool(), -pairs[:, 0], pairs[:, 0])
    return pairs


def _hash(states: torch.Tensor, code: str) -> torch.Tensor:
    a, b = LCG[code]
    return (states.to(torch.int64) * a + b) & _MASK32


def code_values(code: str, L: int = 16) -> torch.Tensor:
    """The value of every state 0 … 2^L − 1 (float32), unscaled.

    1MAD: the four bytes of the hash summed, (sum − 510)/147.8 (a sum of four uniform bytes: ≈ N(0, 1)).
    3INST: each 16-bit half of the hash keeps its sign and low 12 bits (mantissa and the two low exponent
    bits), xor 0x3B60 (fp16 0.922), read as fp16; the two halves summed."""
    if code not in LCG:
        raise HarpqError(f"unknown computed trellis code {code!r} (offered: {', '.join(LCG)})")
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


@functools.cache
def unit_values(code: str, L: int) -> torch.Tensor:
    """The code's state values scaled to unit RMS (the scale the stored matrix scale multiplies)."""
    v = code_values(code, L).double()
    return (v / v.pow(2).mean().sqrt()).float()


def words_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """(S, 32·w) bool, most significant first -> (S, w) int32."""
    s = bits.shape[0]
    weights = 1 << torch.arange(31, -1, -1, dtype=torch.int64, device=bits.device)
    words = (bits.view(s, -1, 32).long() * weights).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def bits_from_words(words: torch.Tensor) -> torch.Tensor:
    """(S, w) int32 -> (S, 32·w) bool, most significant first."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    return ((w[..., None] >> torch.arange(31, -1, -1, device=words.device)) & 1).bool().reshape(words.shape[0], -1)


def _tile_order() -> torch.Tensor:
    """Position p = 8l + j of the walk -> the tile's weight (row · 16 + column) it codes: lane l = 4g + t,
    rows g (j < 4) and g + 8 (j ≥ 4), column 4t + j mod 4."""
    p = torch.arange(TILE * TILE)
    lane, j = p // 8, p % 8
    g, t = lane // 4, lane % 4
    return (g + 8 * (j // 4)) * TILE + 4 * t + j % 4


TILE_ORDER = _tile_order()
_TILE_INVERSE = torch.argsort(TILE_ORDER)


def to_tiles(w: torch.Tensor) -> torch.Tensor:
    """(m, n) -> (m/16 · n/16, 256): one row per tile, its weights in walk order (`TILE_ORDER`)."""
    m, n = w.shape
    rows = w.reshape(m // TILE, TILE, n // TILE, TILE).permute(0, 2, 1, 3).reshape(-1, TILE * TILE)
    return rows[:, TILE_ORDER.to(w.device)]


def from_tiles(t: torch.Tensor, m: int, n: int) -> torch.Tensor:
    rows = t[:, _TILE_INVERSE.to(t.device)]
    return rows.reshape(m // TILE, n // TILE, TILE, TILE).permute(0, 2, 1, 3).reshape(m, n)


class TrellisTiles(StorageFormat):
    name = "qtip"

    def __init__(self, bits: int, L: int = 16, code: str = "3inst"):
        self.bits, self.L, self.code = bits, L, code
        self.per_state = values_per_state(code)
        self.shift = bits * self.per_state  # bits a step of the walk shifts in

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits, "L": self.L, "code": self.code}

    def buffer_specs(self, out_features: int, in_features: int) -> BufferSpec:
        tiles = (out_features // TILE) * (in_features // TILE)
        specs = {"codes": ((tiles, TILE * TILE * self.bits // 32), torch.int32), "scales": ((1, 1), torch.float16)}
        if self.code == "hyb":
            specs["table"] = ((1 << HYB_ROWS, 2), torch.float16)
        return specs

    def row_concatenated(self):
        return ("codes",)  # row-block-major tiles; scales: one per matrix -> one per row

    def concat_rows(self, parts, in_features):
        """Tiles stacked (row-block-major: the row blocks of one matrix after another), the matrices' scales
        as one per row (m, 1); HYB's tables differ per matrix, so HYB matrices do not stack."""
        if self.code == "hyb":
            return None
        return {"codes": torch.cat([b["codes"] for b, _ in parts]),
                "scales": torch.cat([b["scales"].reshape(1, 1).expand(m, 1) for b, m in parts])}

    def values(self, buffers: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """Every state's values (2^L, V) for the matrix stored in `buffers` (or being stored: its table)."""
        if self.code == "hyb":
            return hyb_values(buffers["table"].to(device), self.L)
        return unit_values(self.code, self.L).to(device)[:, None]

    def encode(self, walks: torch.Tensor, scale: torch.Tensor, table: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
        """walks (tiles, 256 / V) tail-biting state sequences, scale (1, 1) [, HYB's table] -> stored tensors."""
        out = {"codes": words_from_bits(pack(walks, self.L, self.shift)), "scales": scale.reshape(1, 1).half()}
        if self.code == "hyb":
            out["table"] = table.half()
        return out

    def walks(self, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        return unpack(bits_from_words(buffers["codes"]), self.L, self.shift, TILE * TILE // self.per_state)

    def decode(self, buffers: dict[str, torch.Tensor], out_features: int, in_features: int) -> torch.Tensor:
        values = self.values(buffers, buffers["codes"].device)
        tiles = values[self.walks(buffers)].reshape(-1, TILE * TILE)  # a state's V values are consecutive weights
        return from_tiles(tiles, out_features, in_features) * buffers["scales"].float()
