"""Linears that read one input through one input transform, applied once.

With RHT or Kronecker sides the pipeline draws one input side per group of linears that read the same
tensor (q/k/v; gate/up), so their Vᵀ x is the same vector: computing it once per group instead of once
per linear saves one transform (two kernel launches) per extra member. Each module then runs its own
GEMV and output side on the shared rotated input.
"""

from __future__ import annotations

import torch
from torch import nn

from .quant_linear import QuantLinear


class SharedInput(nn.Module):
    """[m(x) for m in mods], with the mods' common input transform applied once."""

    def __init__(self, mods: list[QuantLinear]):
        super().__init__()
        self.mods = nn.ModuleList(mods)

    @classmethod
    def build(cls, mods: list[nn.Module]) -> SharedInput | None:
        """A group of two or more QuantLinears whose input sides are equal, else None."""
        if len(mods) < 2 or any(type(m) is not QuantLinear for m in mods):
            return None
        if not all(mods[0].shares_input_side(m) for m in mods[1:]):
            return None
        return cls(list(mods))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        first = self.mods[0]
        if x.device.type == "cpu" and first.use_kernels is not True:  # dense copies carry their transforms
            return [m(x) for m in self.mods]
        rows = first.rotate_input(x.reshape(-1, first.in_features))
        return [m.from_rotated(rows, x.shape[:-1]) for m in self.mods]


def tie_input_sides(root: nn.Module, prefix: str = "") -> None:
    """Give every QuantLinear under `root` that borrows its input side (`input_side_from`, a full module name
    starting with `prefix`) its leader's tensors: after loading, where the checkpoint holds the side once."""
    for mod in root.modules():
        if isinstance(mod, QuantLinear) and mod.input_side_from:
            name = mod.input_side_from
            if not name.startswith(prefix):
                raise ValueError(f"input side of {name}, outside {prefix or 'the model'}")
            try:
                leader = root.get_submodule(name[len(prefix):])
            except AttributeError:
                raise ValueError(f"a module takes its input side from {name}, which the model does not have") from None
            mod.take_input_side(leader, name, equal_values=False)
