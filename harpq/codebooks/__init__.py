"""Codebooks (how codes are chosen): scalar grids and QuIP#'s lattice codes, built by `make_codebook`."""

from __future__ import annotations

from typing import Any

from ..formats import stored_bits
from ..registry import build
from .base import Codebook
from .qtip import QTIPCodebook
from .quipsharp import E8PCodebook
from .scalar import SCALAR_BITS, ScalarGrid

CODEBOOKS: dict[str, type[Codebook]] = {"scalar": ScalarGrid, "e8p": E8PCodebook, "qtip": QTIPCodebook}


#: settings a saved config lacks because it was written before they existed, and what they meant then
_BEFORE_KEYS = {"scalar": {"row_tile": 0}, "e8p": {"row_tile": 0}}


def make_codebook(config: dict[str, Any]) -> Codebook:
    """Build a codebook from its `config()` dict."""
    return build(CODEBOOKS, config, "codebook")


def saved_codebook(config: dict[str, Any]) -> Codebook:
    """Build the codebook a checkpoint's per-module config describes (older checkpoints included)."""
    return make_codebook({**_BEFORE_KEYS.get(config.get("name"), {}), **config})


__all__ = ["CODEBOOKS", "Codebook", "E8PCodebook", "QTIPCodebook", "SCALAR_BITS", "ScalarGrid", "make_codebook",
           "saved_codebook", "stored_bits"]
