"""QuIP#'s lattice codes: E8P (16 bits per 8 weights), optionally plus a residual stage.

Stage two is the 1-bit E8 codebook (8 bits per 8 weights: 3 bits per weight in all) or E8P again (4 bits
per weight), added with weight 1/resid. One fp16 scale per matrix multiplies the sum. The code word
layout is `lattice.e8p_decode`'s. As for scalar grids, matrices whose rows are a multiple of `row_tile` (16; 0
in checkpoints written before it existed) store both stages' codes row-tiled (`packing.to_row_tiles`, chunks
of 32 codes: 64 bytes of stage one), so that the rows a decode kernel's warp reads together are contiguous.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import BufferSpec, StorageFormat
from .lattice import e8p_decode, on_device
from .packing import from_row_tiles, to_row_tiles

STAGE2 = {2: None, 3: "e8", 4: "e8p"}
#: codes of a row per chunk of the row-tiled layout
TILE_CHUNK = 32


class E8PStages(StorageFormat):
    name = "e8p"

    def __init__(self, bits: int, resid: float | None, row_tile: int = 16):
        if bits not in STAGE2:
            raise ValueError(f"E8P stores 2, 3 or 4 bits per weight, not {bits}")
        self._set_row_tile(row_tile)
        self.bits = bits
        self.stage2 = STAGE2[bits]
        self.resid = resid if self.stage2 else None

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits, "resid": self.resid, "row_tile": self.row_tile}

    def codes_by_row(self, codes: torch.Tensor) -> torch.Tensor:
        """Stored codes of either stage (m, n/8) as rows, whatever the layout."""
        return from_row_tiles(codes, self.row_tile, TILE_CHUNK) if self.tiled(codes.shape[0]) else codes

    def _stored(self, codes: torch.Tensor) -> torch.Tensor:
        return to_row_tiles(codes, self.row_tile, TILE_CHUNK) if self.tiled(codes.shape[0]) else codes

    def buffer_specs(self, out_features: int, in_features: int) -> BufferSpec:
        specs: BufferSpec = {"codes": ((out_features, in_features // 8), torch.int16),
                             "scales": ((1, 1), torch.float16)}
        if self.stage2:
            specs["codes2"] = ((out_features, in_features // 8), torch.uint8 if self.stage2 == "e8" else torch.int16)
        return specs

    def encode(self, codes: torch.Tensor, codes2: torch.Tensor | None, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """codes (m, n/8) E8P code words [, codes2 (m, n/8) stage-two codes], scale (1, 1)."""
        out = {"codes": self._stored(codes.to(torch.int64).to(torch.int16)), "scales": scale.reshape(1, 1).half()}
        if self.stage2:
            out["codes2"] = self._stored(codes2.to(torch.uint8 if self.stage2 == "e8" else torch.int16))
        return out

    def row_concatenated(self):
        return ("codes", "codes2") if self.stage2 else ("codes",)  # scales: one per matrix -> one per row

    def concat_rows(self, parts, in_features):
        """Codes stacked, and the matrices' scales as one per row (m, 1): what the decode GEMV takes."""
        if self._tiles_straddle(parts):
            return None
        out = {"codes": torch.cat([b["codes"] for b, _ in parts]),
               "scales": torch.cat([b["scales"].reshape(1, 1).expand(m, 1) for b, m in parts])}
        if self.stage2:
            out["codes2"] = torch.cat([b["codes2"] for b, _ in parts])
        return out

    def decode(self, buffers: dict[str, torch.Tensor], out_features: int, in_features: int) -> torch.Tensor:
        q = e8p_decode(self.codes_by_row(buffers["codes"]))
        if self.stage2:
            c2 = self.codes_by_row(buffers["codes2"]).to(torch.int64)
            if self.stage2 == "e8":
                q2 = on_device("one_bit", c2.device, torch.float32)[c2 & 0xFF]
            else:
                q2 = e8p_decode(c2)
            q = q + q2 / self.resid
        return q.reshape(out_features, in_features) * buffers["scales"].float()
