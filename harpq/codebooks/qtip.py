"""QTIP's trellis-coded quantization as a codebook: 16 × 16 tiles, each one tail-biting walk of k bits per weight.

Inside BlockLDLQ (g = 16 columns at a time) the m × 16 block is m/16 tiles; each tile, in the storage format's
walk order, is one sequence of 256 weights quantized by Viterbi on the (L, k, 1) bitshift trellis with a computed code
(3INST by default; 1MAD; HYB, two weights per state from a 512-row table stored with the matrix) and
QTIP's two-pass tail-biting, so a tile stores exactly 256·k bits
(QTIP §4.5). One scale per matrix: the codebook sees W̃ · ρ / RMS(W̃) against unit-RMS code values
(ρ = 0.9, QTIP's scale override). The codes handed back per row are the walk's states (the storage format
packs each tile's walk into its bitstream).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..errors import HarpqError
from ..formats.trellis import CODES, TILE, TrellisTiles, from_tiles, hyb_table, to_tiles
from .base import Codebook
from .scalar import fp16_ceil
from .trellis import quantize_tail_biting

BITS = (2, 3, 4)


class QTIPCodebook(Codebook):
    name = "qtip"
    dim = TILE

    def __init__(self, bits: int = 2, L: int = 16, code: str = "3inst", scale: float = 0.9):
        if bits not in BITS:
            raise HarpqError(f"the qtip codebook offers {', '.join(map(str, BITS))} bits, not {bits}")
        if code not in CODES:
            raise HarpqError(f"unknown trellis code {code!r} (offered: {', '.join(CODES)})")
        if not (bits < L <= 20):
            raise HarpqError(f"the qtip trellis needs {bits} < L ≤ 20 state bits, not {L}")
        if scale <= 0:
            raise HarpqError("the qtip scale must be positive")
        self.bits, self.L, self.code, self.rho = bits, L, code, float(scale)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits, "L": self.L, "code": self.code, "scale": self.rho}

    def check_shape(self, out_features: int, in_features: int, name: str) -> None:
        if out_features % TILE or in_features % TILE:
            raise HarpqError(f"{name} is {out_features}×{in_features}: qtip codes 16×16 tiles, so both must be "
                             "multiples of 16")

    def prepare(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        rms = weight.float().pow(2).mean().sqrt().clamp(min=1e-12)
        state = {"scale": fp16_ceil(rms / self.rho).reshape(1, 1).to(weight.device)}
        if self.code == "hyb":
            state["table"] = _hyb_table().to(weight.device)
        return state

    def round(self, x: torch.Tensor, cols: torch.Tensor, state: dict[str, torch.Tensor]):
        m, k = x.shape
        if m % TILE or k != TILE:
            raise HarpqError(f"qtip rounds blocks of 16 columns over a multiple of 16 rows, not {m}×{k}")
        fmt = self.storage
        s = state["scale"].to(x.dtype)
        values = fmt.values(state, x.device)  # (2^L, V)
        v = fmt.per_state
        seqs = to_tiles(x / s).float().reshape(-1, TILE * TILE // v, v)
        # sequences per Viterbi: its back-pointers take 256 × chunk × 2^(L − k·V) bytes (at most 1 GiB on
        # the CPU, 4 GiB on a GPU)
        back_bytes = 1 << (32 if x.is_cuda else 30)
        chunk = max(1, back_bytes // (TILE * TILE * (1 << (self.L - fmt.shift))))
        walks = torch.cat([quantize_tail_biting(seqs[i:i + chunk], values, self.L, fmt.shift)
                           for i in range(0, seqs.shape[0], chunk)])  # (tiles, 256 / V)
        recon = values[walks].reshape(-1, TILE * TILE)
        codes = walks.repeat_interleave(v, dim=1)  # each weight carries its state (V consecutive weights share one)
        return from_tiles(codes, m, k), from_tiles(recon.to(x.dtype), m, k) * s

    def fit_target(self) -> Codebook:
        """A Viterbi per tile at every refresh of HARP's target would dominate its fit: it fits against E8P at
        the same bits instead (also a Gaussian-shaped code of ~0.09 MSE at 2 bits), then rounds with the trellis."""
        from .quipsharp import E8PCodebook

        return E8PCodebook(self.bits)

    @property
    def storage(self) -> TrellisTiles:
        return TrellisTiles(self.bits, self.L, self.code)

    def encode(self, codes: torch.Tensor, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        fmt = self.storage
        walks = to_tiles(codes)[:, :: fmt.per_state]
        return fmt.encode(walks, state["scale"], state.get("table"))


@functools.cache
def _hyb_table() -> torch.Tensor:
    """HYB's table as stored (fp16): k-means once per process."""
    return hyb_table().half()
