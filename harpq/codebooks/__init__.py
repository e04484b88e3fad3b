"""Codebooks: scalar grids now; lattice and residual codebooks plug in through `make_codebook`."""

from __future__ import annotations

from typing import Any

from ..errors import HarpqError
from .base import Codebook, stored_bits
from .quipsharp import E8PCodebook
from .scalar import SCALAR_BITS, ScalarGrid

CODEBOOKS: dict[str, type[Codebook]] = {"scalar": ScalarGrid, "e8p": E8PCodebook}


def make_codebook(config: dict[str, Any]) -> Codebook:
    """Build a codebook from its `config()` dict."""
    cfg = dict(config)
    name = cfg.pop("name")
    if name not in CODEBOOKS:
        raise HarpqError(f"unknown codebook {name!r} (offered: {', '.join(CODEBOOKS)})")
    return CODEBOOKS[name](**cfg)


__all__ = ["CODEBOOKS", "Codebook", "E8PCodebook", "SCALAR_BITS", "ScalarGrid", "make_codebook", "stored_bits"]
