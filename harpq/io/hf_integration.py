"""Registers `quant_method: "harpq"` with transformers, so `from_pretrained(path)` loads our models.

Before weights load, every module listed in `quantization_config["modules"]` is swapped for an empty
`QuantLinear` of the right storage shapes; transformers then fills its buffers from the safetensors
files like any other weights, keeping their dtypes (int32 codes, fp16 scales).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..nn import QuantExperts, QuantLinear, tie_input_sides
from .checkpoint import verify_manifest

QUANT_METHOD = "harpq"
#: directories whose manifest `harpq.load` has just checked (not hashed twice)
VERIFIED: set[Path] = set()


class HarpqConfig(QuantizationConfigMixin):
    """The `quantization_config` of a harpq checkpoint: format, recipe and one spec per module."""

    def __init__(
        self,
        modules: dict[str, dict[str, Any]] | None = None,
        recipe: dict[str, Any] | None = None,
        format_version: int = 1,
        harpq_version: str | None = None,
        **kwargs: Any,
    ):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.harpq_version = harpq_version
        self.recipe = recipe or {}
        self.modules = modules or {}
        for key, value in kwargs.items():
            if key != "quant_method":
                setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


class HarpqHfQuantizer(HfQuantizer):
    """Load-only: harpq checkpoints are made by `harpq quantize`, never on the fly."""

    requires_calibration = True

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        version = getattr(self.quantization_config, "format_version", 1)
        if version != 1:
            raise ValueError(f"harpq checkpoint format {version} is newer than this harpq reads (1)")

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        files = kwargs.get("checkpoint_files") or []
        if files:  # `from_pretrained` after `import harpq` checks the manifest as `harpq.load` does
            directory = Path(files[0]).resolve().parent
            if directory not in VERIFIED:
                verify_manifest(directory)
        install_quant_linears(model, self.quantization_config.modules, device="meta")

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        tie_input_sides(model)  # linears whose shared input side the checkpoint holds once, with another

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def module_from_spec(spec: dict[str, Any], device: str | torch.device | None = None) -> nn.Module:
    """An empty quantized module from its entry in `quantization_config["modules"]`."""
    if spec.get("kind") == "experts":
        return QuantExperts.from_spec(spec, device=device)
    return QuantLinear.from_spec(spec, device=device)


def install_quant_linears(model: nn.Module, modules: dict[str, dict[str, Any]], device: str | None = None) -> None:
    """Replace each named linear (or experts module) of `model` by an empty quantized one built from its spec."""
    from ..pipeline.experts import is_experts

    if not modules:
        raise ValueError("the quantization_config of this harpq checkpoint lists no quantized modules")
    for name, spec in modules.items():
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            current = getattr(parent, child)
        except AttributeError:
            raise ValueError(f"quantization_config names {name}, which this architecture does not have") from None
        expected = is_experts(current) if spec.get("kind") == "experts" else isinstance(current, nn.Linear)
        if not expected:
            raise ValueError(f"quantization_config names {name}, which is not a module of that kind here")
        setattr(parent, child, module_from_spec(spec, device=device))


def register() -> None:
    """Idempotent registration with transformers' quantizer registry."""
    AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, HarpqConfig)
    AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, HarpqHfQuantizer)


register()  # importing this module (harpq.load does) is enough to read harpq checkpoints
