"""Recipes: a typed, serialisable choice of processor × codebook × rounding, with per-module overrides.

A method (`rtn`, `gptq`, ...) is only a preset of these fields. Overrides are (regex, fields) pairs
matched with `re.search` against full module names; later ones win. Modules matching `ignore` stay
unquantized (`lm_head` by default; embeddings are not linear layers and are never touched).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .errors import HarpqError

METHODS: dict[str, dict[str, Any]] = {
    "rtn": {"processor": "none", "codebook": "scalar", "rounding": "nearest"},
    "gptq": {"processor": "none", "codebook": "scalar", "rounding": "ldlq"},
    "quip": {"processor": "kron", "codebook": "scalar", "rounding": "ldlq", "scale": "rms", "group_size": 0},
    "quipsharp": {"processor": "rht", "codebook": "e8p", "rounding": "ldlq", "bits": 2},
    "hqq": {"processor": "none", "codebook": "hqq", "rounding": "nearest", "group_size": 64},
    "harp": {"processor": "harp", "codebook": "e8p", "rounding": "ldlq", "bits": 2},
}


def derive_seed(seed: int, name: str) -> int:
    """A per-module seed: stable across runs and machines, different for every module name."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**31


@dataclass(frozen=True)
class LayerRecipe:
    """The settings that decide how one linear layer is quantized."""

    bits: int = 4
    group_size: int = 128
    ragged_groups: bool = False
    scale: str = "minmax"
    e8p_scale: float | None = None
    processor: str = "none"
    codebook: str = "scalar"
    rounding: str = "nearest"
    damp: float = 0.01
    act_order: bool = False
    tune_passes: int = 0
    seed: int = 0
    input_seed: int | None = None
    harp_steps: int = 1200
    harp_schedule: str = "greedy"
    harp_store: str = "fp16"

    def codebook_config(self) -> dict[str, Any]:
        if self.codebook in ("scalar", "hqq"):  # hqq is the scalar grid with HQQ's zero-point solver
            return {"name": "scalar", "bits": self.bits, "group_size": self.group_size,
                    "ragged_groups": self.ragged_groups, "scale": "hqq" if self.codebook == "hqq" else self.scale}
        if self.codebook == "e8p":
            return {"name": "e8p", "bits": self.bits, "scale": self.e8p_scale}
        return {"name": self.codebook, "bits": self.bits}

    def processor_config(self) -> dict[str, Any]:
        if self.processor == "none":
            return {"name": "none"}
        cfg = {"name": self.processor, "seed": self.seed, "input_seed": self.input_seed}
        if self.processor == "harp":
            cfg.update(schedule=self.harp_schedule, store=self.harp_store, steps=self.harp_steps)
        return cfg

    @property
    def needs_hessian(self) -> bool:
        return self.rounding != "nearest" or self.processor == "harp"


_LAYER_FIELDS = {f.name for f in fields(LayerRecipe)}


@dataclass
class Recipe:
    method: str = "rtn"
    layer: LayerRecipe = field(default_factory=LayerRecipe)
    ignore: list[str] = field(default_factory=lambda: [r"(^|\.)lm_head$"])
    overrides: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: pick the e8p scale per model on the first layer's proxy loss (the chosen value lands in `layer`)
    scale_sweep: bool = False

    @classmethod
    def preset(cls, method: str, scale_sweep: bool = False, **settings: Any) -> Recipe:
        """A method's preset with any layer fields changed, e.g. `Recipe.preset("gptq", bits=3)`."""
        if method not in METHODS:
            raise HarpqError(f"unknown method {method!r} (offered: {', '.join(METHODS)})")
        unknown = set(settings) - _LAYER_FIELDS
        if unknown:
            raise HarpqError(f"unknown recipe setting(s): {', '.join(sorted(unknown))}")
        chosen = {k: v for k, v in settings.items() if v is not None}
        return cls(method=method, layer=LayerRecipe(**{**METHODS[method], **chosen}), scale_sweep=scale_sweep)

    def layer_variants(self) -> list[LayerRecipe]:
        """The default layer settings and each override applied to them (for checks before any work)."""
        return [self.layer, *(replace(self.layer, **changes) for _, changes in self.overrides)]

    def for_module(self, name: str) -> LayerRecipe | None:
        """The resolved settings of one module, or None if it stays unquantized."""
        if any(re.search(p, name) for p in self.ignore):
            return None
        layer = self.layer
        for pattern, changes in self.overrides:
            if re.search(pattern, name):
                layer = replace(layer, **changes)
        return replace(layer, seed=derive_seed(layer.seed, name))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["overrides"] = [[p, dict(c)] for p, c in self.overrides]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        return cls(
            method=d["method"],
            layer=LayerRecipe(**d["layer"]),
            ignore=list(d["ignore"]),
            overrides=[(p, dict(c)) for p, c in d.get("overrides", [])],
            scale_sweep=d.get("scale_sweep", False),
        )
