"""The storage-format interface: what a quantized linear stores and what those bits mean.

A codebook decides which codes to choose; its storage format decides how the codes, scales and zero-points
are laid out in tensors, how they decode back to weights (the PyTorch reference every kernel is tested
against), and what a kernel may assume about them. Kernels are registered per format
(`harpq.kernels.backends`), never per codebook or processor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

BufferSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]


class StorageFormat(ABC):
    """The stored tensors of one quantized matrix (out_features × in_features) and their decode."""

    #: the key kernel backends are registered under
    name: str
    #: rows per tile of the row-tiled code layout (`packing.to_row_tiles`), 0 for rows one after another
    row_tile: int = 0

    def tiled(self, out_features: int) -> bool:
        """Whether a matrix of this many rows stores its codes row-tiled."""
        return bool(self.row_tile) and out_features % self.row_tile == 0

    def _set_row_tile(self, row_tile: int) -> None:
        if row_tile not in (0, 16):
            raise ValueError(f"row tile {row_tile} is not 0 (rows one after another) or 16")
        self.row_tile = row_tile

    def _tiles_straddle(self, parts: list[tuple[dict[str, torch.Tensor], int]]) -> bool:
        """Whether stacking these matrices' rows would put one tile across two of them."""
        return bool(self.row_tile) and any(m % self.row_tile for _, m in parts)

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """What identifies the layout (JSON-serialisable; also part of a kernel's cache key)."""

    @abstractmethod
    def buffer_specs(self, out_features: int, in_features: int) -> BufferSpec:
        """Name -> (shape, dtype) of every stored tensor, so empty modules can be built before loading."""

    @abstractmethod
    def decode(self, buffers: dict[str, torch.Tensor], out_features: int, in_features: int) -> torch.Tensor:
        """Stored tensors -> the weight they encode (float32): the reference every kernel must match."""

    def random_buffers(self, out_features: int, in_features: int, generator: torch.Generator,
                       device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Random but valid stored tensors (any integer pattern is a legal code; scales small, positive):
        what kernel tests and speed benchmarks run on."""
        out = {}
        for name, (shape, dtype) in self.buffer_specs(out_features, in_features).items():
            if dtype.is_floating_point:
                rand = torch.rand(shape, device=device, generator=generator)
                out[name] = (rand * 0.02 + 0.001).to(dtype)
            else:
                lo, hi = torch.iinfo(dtype).min, torch.iinfo(dtype).max + 1
                out[name] = torch.randint(lo, hi, shape, dtype=dtype, device=device, generator=generator)
        return out

    def concat_rows(self, parts: list[tuple[dict[str, torch.Tensor], int]], in_features: int
                    ) -> dict[str, torch.Tensor] | None:
        """The stored tensors of the matrices (buffers, rows) stacked along rows, or None where this format
        cannot hold them as one matrix (a scale shared by a whole matrix, say)."""
        return None

    def row_concatenated(self) -> tuple[str, ...]:
        """The stored tensors that `concat_rows` returns as the plain concatenation of the matrices' own along
        dim 0 (so each matrix's may become a view of its part); packed or widened ones are not listed."""
        return ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config()})"


def stored_bits(specs: BufferSpec) -> int:
    """Total bits of a set of stored tensors."""
    total = 0
    for shape, dtype in specs.values():
        numel = 1
        for s in shape:
            numel *= s
        total += numel * torch.empty((), dtype=dtype).element_size() * 8
    return total
