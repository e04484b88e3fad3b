"""The codebook interface: how groups of weights become codes.

A codebook works in the processed (incoherent) domain. `prepare` fixes the per-matrix state (scales,
zero-points) before rounding starts, so every rounding algorithm sees the same grid; `round` maps a
slab of columns to codes and their reconstruction; `encode` hands the codes to the codebook's storage
format (`harpq.formats`), which owns the stored tensors and their decode.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from ..formats import BufferSpec, StorageFormat


class Codebook(ABC):
    """Maps vectors of `dim` consecutive input-dim weights to codes and back."""

    name: str
    #: weights per code vector: the block size g of BlockLDLQ (1 for scalar grids)
    dim: int = 1

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Everything `make_codebook` needs to rebuild this codebook (JSON-serialisable)."""

    def check_shape(self, out_features: int, in_features: int, name: str) -> None:
        """Raise `HarpqError` if this codebook cannot store a matrix of this shape."""
        if in_features % self.dim:
            from ..errors import HarpqError

            raise HarpqError(f"in_features {in_features} of {name} is not a multiple of {self.dim} ({self.name})")

    @abstractmethod
    def prepare(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-matrix state (scales, zero-points) fixed before rounding, from the processed weight."""

    @abstractmethod
    def round(
        self, x: torch.Tensor, cols: torch.Tensor, state: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize columns `cols` (values `x`, shape (m, len(cols))) -> (codes, reconstruction)."""

    @property
    @abstractmethod
    def storage(self) -> StorageFormat:
        """The storage format the codes of this codebook are kept in."""

    @abstractmethod
    def encode(self, codes: torch.Tensor, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Codes of the whole matrix plus state -> the tensors that are stored."""

    def fit_target(self) -> Codebook:
        """The codebook a learned processor fits its rotation against (HARP's refreshed target): this one,
        unless its search is too costly to repeat every few steps."""
        return self

    def decode(self, buffers: dict[str, torch.Tensor], out_features: int, in_features: int) -> torch.Tensor:
        """Stored tensors -> the reconstructed processed weight (float32)."""
        return self.storage.decode(buffers, out_features, in_features)

    def buffer_specs(self, out_features: int, in_features: int) -> BufferSpec:
        """Name -> (shape, dtype) of every stored tensor, so empty modules can be built before loading."""
        return self.storage.buffer_specs(out_features, in_features)
