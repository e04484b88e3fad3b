"""Building a part (codebook, processor) from its JSON config: {"name": ..., **settings}."""

from __future__ import annotations

from typing import Any, TypeVar

from .errors import HarpqError

T = TypeVar("T")


def build(registry: dict[str, type[T]], config: dict[str, Any], kind: str) -> T:
    cfg = dict(config)
    name = cfg.pop("name")
    if name not in registry:
        raise HarpqError(f"unknown {kind} {name!r} (offered: {', '.join(registry)})")
    return registry[name](**cfg)
