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
    "qtip": {"processor": "rht", "codebook": "qtip", "rounding": "ldlq", "bits": 2},
}


def derive_seed(seed: int, name: str) -> int:
    """A per-module seed: stable across runs and machines, different for every module name."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**31


@dataclass(frozen=True)
class LayerRecipe:
    """The settings that decide how one linear layer is quantized."""

    bits: int = 4
    group_size: int = 128
    #: let the last group of a row be shorter where the group size does not divide it (off: refuse instead)
    ragged_groups: bool = True
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
    #: HARP's defaults are the setting that measured best at equal bits on llama-small (kron stages stored
    #: as int8, 40 Adam steps, the target searched at every step) and fits Llama-2-7B shapes in about two
    #: thirds of an H200-hour at 2 bits (benchmarks/RESULTS.md)
    harp_steps: int = 40
    harp_schedule: str = "kron"
    harp_store: str = "int8"
    #: seconds this module's HARP fit may take (set per module from the run's `Recipe.harp_budget`)
    harp_seconds: float | None = None
    #: HARP: steps between two searches of the codebook for the fit's target
    harp_refresh: int = 1
    #: qtip: state bits L of the trellis (Viterbi's work and memory grow as 2^L; QTIP uses 16)
    trellis_L: int = 16

    def codebook_config(self) -> dict[str, Any]:
        if self.codebook in ("scalar", "hqq"):  # hqq is the scalar grid with HQQ's zero-point solver
            return {"name": "scalar", "bits": self.bits, "group_size": self.group_size,
                    "ragged_groups": self.ragged_groups, "scale": "hqq" if self.codebook == "hqq" else self.scale}
        if self.codebook == "e8p":
            return {"name": "e8p", "bits": self.bits, "scale": self.e8p_scale}
        if self.codebook == "qtip":
            return {"name": "qtip", "bits": self.bits, "L": self.trellis_L}
        return {"name": self.codebook, "bits": self.bits}

    def processor_config(self) -> dict[str, Any]:
        if self.processor == "none":
            return {"name": "none"}
        cfg = {"name": self.processor, "seed": self.seed, "input_seed": self.input_seed}
        if self.processor == "harp":
            cfg.update(schedule=self.harp_schedule, store=self.harp_store, steps=self.harp_steps)
            if self.harp_seconds is not None:
                cfg["seconds"] = self.harp_seconds
            if self.harp_refresh != 1:
                cfg["refresh"] = self.harp_refresh
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
    #: seconds of HARP fitting for the whole run, shared by the HARP linears as they come (None: no limit)
    harp_budget: float | None = None

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
            harp_budget=d.get("harp_budget"),
        )


#: what `harpq methods` says of each method: what it is, and how long it takes on a 2-core CPU for a ~30M
#: model (llama-small), the measured order of magnitude
METHOD_NOTES: dict[str, tuple[str, str]] = {
    "rtn": ("round to nearest, per-group scale and zero", "seconds (streamed from the files)"),
    "gptq": ("GPTQ/OPTQ: LDLQ error feedback through the Hessian", "minutes"),
    "quip": ("QuIP: Kronecker incoherence processing + LDLQ", "minutes"),
    "quipsharp": ("QuIP#: randomized Hadamard + E8P lattice + BlockLDLQ", "minutes"),
    "hqq": ("HQQ: half-quadratic zero-point fit, no data", "seconds (streamed from the files)"),
    "harp": ("HARP: learned butterfly rotation + E8P + BlockLDLQ", "about ten minutes (fits each rotation)"),
    "qtip": ("QTIP: randomized Hadamard + trellis codes (3INST, 16×16 tiles) + BlockLDLQ",
             "hours (a Viterbi over 65,536 states per 256 weights; use a GPU)"),
}


def method_table() -> list[dict[str, Any]]:
    """One row per method: its parts, default bits and group size, whether it needs calibration text."""
    rows = []
    for method in METHODS:
        layer = Recipe.preset(method).layer
        note, speed = METHOD_NOTES[method]
        vector = layer.codebook in ("e8p", "qtip")
        group = "-" if vector else ("row" if layer.group_size == 0 else str(layer.group_size))
        rows.append({"method": method, "processor": layer.processor, "codebook": layer.codebook,
                     "rounding": layer.rounding, "bits": layer.bits, "group": group,
                     "calibration": "yes" if layer.needs_hessian else "no", "cpu time": speed, "what": note})
    return rows


RECIPE_FORMAT = "harpq-recipe"
_TOP_KEYS = {"format", "version", "method", "layer", "ignore", "overrides", "scale_sweep", "harp_budget",
             "calibration"}
CALIBRATION_KEYS = ("calib", "nsamples", "seqlen", "seed")


_FIELD_TYPES = {f.name: f.type for f in fields(LayerRecipe)}  # "int", "bool", "float | None", ...
_KINDS = {"int": int, "bool": bool, "str": str, "float": float}


def _coerce(key: str, value: Any, where: str) -> Any:
    """`value` as LayerRecipe field `key` takes it (strings from the command line are parsed)."""
    if key not in _FIELD_TYPES:
        raise HarpqError(f"{where}: unknown setting {key!r} (offered: {', '.join(sorted(_FIELD_TYPES))})")
    name, _, optional = _FIELD_TYPES[key].partition(" | ")
    kind = _KINDS[name]
    if value is None or isinstance(value, str) and optional and value.strip().lower() in ("none", "null"):
        if optional:
            return None
        raise HarpqError(f"{where}: {key} needs a value")
    if isinstance(value, str) and kind is not str:
        text = value.strip().lower()
        if kind is bool:
            if text not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise HarpqError(f"{where}: {key} takes true or false, not {value!r}")
            return text in ("true", "1", "yes", "on")
        try:
            return kind(text)
        except ValueError:
            raise HarpqError(f"{where}: {key} takes {'an integer' if kind is int else 'a number'}, "
                             f"not {value!r}") from None
    fits = isinstance(value, bool) if kind is bool else (
        isinstance(value, int) and not isinstance(value, bool) if kind is int else
        isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else isinstance(value, str))
    if not fits:
        raise HarpqError(f"{where}: {key} takes {'a number' if kind is float else kind.__name__}, not {value!r}")
    return kind(value)


def check_pattern(pattern: str, where: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise HarpqError(f"{where}: {pattern!r} is not a regular expression ({e})") from None
    return pattern


def parse_override(text: str) -> tuple[str, dict[str, Any]]:
    """`REGEX:key=value,key=value` (the command line's --override) -> (regex, settings)."""
    where = f"--override {text!r}"
    pattern, sep, assignments = text.rpartition(":")
    if not sep or not pattern or not assignments.strip():
        raise HarpqError(f"{where}: write it as REGEX:key=value[,key=value], e.g. 'mlp\\.down_proj:bits=4'")
    changes = {}
    for item in assignments.split(","):
        key, eq, value = item.partition("=")
        if not eq:
            raise HarpqError(f"{where}: {item!r} is not key=value")
        changes[key.strip()] = _coerce(key.strip(), value, where)
    return check_pattern(pattern, where), changes


def recipe_file_dict(recipe: Recipe, calibration: dict[str, Any]) -> dict[str, Any]:
    """Everything that decides a quantization run: the recipe and the calibration settings."""
    return {"format": RECIPE_FORMAT, "version": 1, **recipe.to_dict(),
            "calibration": {k: calibration.get(k) for k in CALIBRATION_KEYS}}


def _budget(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise HarpqError(f"{where}: harp_budget is a number of seconds ≥ 0, not {value!r}")
    return float(value)


def recipe_from_file_dict(d: Any, where: str) -> tuple[Recipe, dict[str, Any]]:
    """(Recipe, calibration settings) from a recipe file's content; fields it leaves out take the method's
    preset (layer) or the command line's defaults (calibration)."""
    if not isinstance(d, dict):
        raise HarpqError(f"{where}: a recipe is a mapping with a 'method', not {type(d).__name__}")
    unknown = set(d) - _TOP_KEYS
    if unknown:
        raise HarpqError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                         f"(offered: {', '.join(sorted(_TOP_KEYS))})")
    if d.get("format", RECIPE_FORMAT) != RECIPE_FORMAT or d.get("version", 1) != 1:
        raise HarpqError(f"{where}: not a version-1 {RECIPE_FORMAT} file")
    method = d.get("method")
    if method not in METHODS:
        raise HarpqError(f"{where}: method must be one of {', '.join(METHODS)}, not {method!r}")
    layer = d.get("layer") or {}
    if not isinstance(layer, dict):
        raise HarpqError(f"{where}: 'layer' must be a mapping of settings")
    layer = {k: _coerce(k, v, where) for k, v in layer.items()}
    ignore = d.get("ignore", [r"(^|\.)lm_head$"])
    if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
        raise HarpqError(f"{where}: 'ignore' must be a list of regular expressions")
    overrides = []
    for item in d.get("overrides") or []:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], dict)):
            raise HarpqError(f"{where}: each override is [regex, {{setting: value}}], not {item!r}")
        overrides.append((check_pattern(item[0], where), {k: _coerce(k, v, where) for k, v in item[1].items()}))
    calibration = d.get("calibration") or {}
    if not isinstance(calibration, dict) or set(calibration) - set(CALIBRATION_KEYS):
        raise HarpqError(f"{where}: 'calibration' takes {', '.join(CALIBRATION_KEYS)}")
    recipe = Recipe(method=method, layer=LayerRecipe(**{**METHODS[method], **layer}),
                    ignore=[check_pattern(p, where) for p in ignore], overrides=overrides,
                    scale_sweep=bool(d.get("scale_sweep", False)), harp_budget=_budget(d.get("harp_budget"), where))
    return recipe, {k: v for k, v in calibration.items() if v is not None}
