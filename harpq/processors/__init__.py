"""Incoherence processors: orthogonal transforms applied on both sides of a weight matrix."""

from __future__ import annotations

from typing import Any

from ..registry import build
from .base import Processor
from .harp import HARP
from .identity import Identity
from .rotations import BlockHadamard, KroneckerOrthogonal, RandomizedHadamard

PROCESSORS: dict[str, type[Processor]] = {
    "none": Identity,
    "rht": RandomizedHadamard,
    "rht-block": BlockHadamard,
    "kron": KroneckerOrthogonal,
    "harp": HARP,
}


def make_processor(config: dict[str, Any]) -> Processor:
    """Build a processor from its `config()` dict."""
    return build(PROCESSORS, config, "processor")


__all__ = ["HARP", "PROCESSORS", "BlockHadamard", "Identity", "KroneckerOrthogonal", "Processor",
           "RandomizedHadamard", "make_processor"]
