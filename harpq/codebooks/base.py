"""The codebook interface: how groups of weights become codes, and codes become weights again.

A codebook works in the processed (incoherent) domain. `prepare` fixes the per-matrix state (scales,
zero-points) before rounding starts, so every rounding algorithm sees the same grid; `round` maps a
slab of columns to codes and their reconstruction; `encode`/`decode` move between codes and the
tensors a `QuantLinear` stores.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

BufferSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]


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

    @abstractmethod
    def encode(self, codes: torch.Tensor, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Codes of the whole matrix plus state -> the tensors that are stored."""

    @abstractmethod
    def decode(self, buffers: dict[str, torch.Tensor], out_features: int, in_features: int) -> torch.Tensor:
        """Stored tensors -> the reconstructed processed weight (float32)."""

    @abstractmethod
    def buffer_specs(self, out_features: int, in_features: int) -> BufferSpec:
        """Name -> (shape, dtype) of every stored tensor, so empty modules can be built before loading."""


def stored_bits(specs: BufferSpec) -> int:
    """Total bits of a set of stored tensors."""
    total = 0
    for shape, dtype in specs.values():
        numel = 1
        for s in shape:
            numel *= s
        total += numel * torch.empty((), dtype=dtype).element_size() * 8
    return total
