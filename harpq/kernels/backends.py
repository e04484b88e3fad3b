"""Which kernel computes x · Ŵᵀ for a storage format: a registry of backends per format name.

Every format has the PyTorch reference (decode, then matmul: correct everywhere, the oracle of every
kernel test). Faster backends register themselves for a format's name; `select` takes the first that can
run a call (device, dtype, batch, layout) and says once, per format, which backend runs and why the
faster ones do not. Adding a format means adding its backends; no existing kernel changes.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

import torch

from ..formats import StorageFormat

log = logging.getLogger("harpq.kernels")

#: decode batches; beyond this (prefill) a dequantize + matmul on tensor cores wins
MAX_DECODE_BATCH = 16


class GemvBackend(ABC):
    """Computes y = x · Ŵᵀ for the stored tensors of one storage format."""

    name: str

    @abstractmethod
    def unusable(self, fmt: StorageFormat, x: torch.Tensor, m: int, n: int) -> str | None:
        """Why this backend cannot run x (B, n) against an m × n matrix of `fmt`, or None if it can."""

    def prepare(self, fmt: StorageFormat, buffers: dict[str, torch.Tensor], m: int, n: int) -> tuple[torch.Tensor, ...]:
        """Run-time tensors derived once from the stored ones (the caller caches them per module)."""
        return ()

    def folds_norm(self, x: torch.Tensor) -> bool:
        """Whether `matmul` can take `norm=(weight, eps)` for x: its input then is RMSNorm(x) (Llama's), a decoder
        layer's norm folded into the GEMV instead of a launch of its own."""
        return False

    def folds_glu(self, x: torch.Tensor, m: int) -> bool:
        """Whether `matmul` takes `glu=True` for x and an m-row matrix [gate; up]: it then returns
        silu(gate) · up, (B, m / 2), the SiLU·up of a Llama MLP in the GEMV's store."""
        return False

    @abstractmethod
    def matmul(self, fmt: StorageFormat, buffers: dict[str, torch.Tensor], prepared: tuple[torch.Tensor, ...],
               x: torch.Tensor, m: int, n: int, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, n) -> x · Ŵᵀ (+ residual (B, m)) as (B, m) in x's dtype (a backend that `folds_norm` also
        takes `norm`, one that `folds_glu` takes `glu`)."""


class ReferenceBackend(GemvBackend):
    """Decode the whole matrix, then a matmul: any format, device and batch."""

    name = "reference"

    def unusable(self, fmt, x, m, n):
        return None

    def matmul(self, fmt, buffers, prepared, x, m, n, residual=None):
        y = x @ fmt.decode(buffers, m, n).to(x.dtype).T
        return y if residual is None else y + residual


REFERENCE = ReferenceBackend()
_BACKENDS: dict[str, list[GemvBackend]] = {}
_ANNOUNCED: set[tuple[str, str, str | None]] = set()


def register(format_name: str, backend: GemvBackend) -> None:
    """Offer `backend` for every storage format called `format_name` (tried in registration order)."""
    _BACKENDS.setdefault(format_name, []).append(backend)


def backends_for(format_name: str) -> list[GemvBackend]:
    """The backends offered for a format, in the order `select` tries them (the reference last)."""
    return [*_BACKENDS.get(format_name, []), REFERENCE]


def select(fmt: StorageFormat, x: torch.Tensor, m: int, n: int, fast: bool = True) -> GemvBackend:
    """The first registered backend that can run this call (the reference if none can, or `fast` is off)."""
    reason = "fast kernels switched off" if not fast else None
    if fast:
        for backend in _BACKENDS.get(fmt.name, []):
            reason = backend.unusable(fmt, x, m, n)
            if reason is None:
                _announce(fmt, backend, None, x)
                return backend
    _announce(fmt, REFERENCE, reason, x)
    return REFERENCE


def _announce(fmt: StorageFormat, backend: GemvBackend, reason: str | None, x: torch.Tensor) -> None:
    key = (fmt.name, backend.name, reason)
    if key in _ANNOUNCED:
        return
    _ANNOUNCED.add(key)
    if reason is None:
        log.info("%s matrices run on the %s kernels", fmt.name, backend.name)
    elif x.is_cuda and x.shape[0] <= MAX_DECODE_BATCH:  # a GPU decode on the slow path deserves a warning
        log.warning("%s matrices run on the PyTorch reference path (%s)", fmt.name, reason)
    else:
        log.info("%s matrices run on the PyTorch reference path (%s)", fmt.name, reason)
