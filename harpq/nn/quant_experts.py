"""QuantExperts: the experts of a mixture-of-experts block, each a pair of QuantLinears.

Transformers 5 stores a block's experts as two 3-D parameters, `gate_up_proj` (E, 2I, H) and `down_proj`
(E, H, I), applied by routing each token to its top-k experts. Quantized, expert e is `gate_up[e]` and
`down[e]`; `routed_experts` is the one routing loop, used by this module and by the calibration that
collects each expert's Hessians from the tokens routed to it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .quant_linear import QuantLinear


def routed_experts(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int,
                   gate_up: Callable[[int, torch.Tensor], torch.Tensor],
                   down: Callable[[int, torch.Tensor], torch.Tensor],
                   act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Σ_k weight_k · down_e(act(gate_e(x)) · up_e(x)) over each token's experts e = top_k_index, in the
    order and precision of transformers' experts modules. hidden (T, H); gate_up(e, x) -> (n, 2I)."""
    out = torch.zeros_like(hidden)
    with torch.no_grad():
        mask = torch.nn.functional.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit[:, 0].tolist():
        if e == num_experts:
            continue
        top_k_pos, token = torch.where(mask[e])
        g, u = gate_up(e, hidden[token]).chunk(2, dim=-1)
        y = down(e, act(g) * u) * top_k_weights[token, top_k_pos, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


class QuantExperts(nn.Module):
    """Drop-in for a transformers experts module: forward(hidden, top_k_index, top_k_weights)."""

    def __init__(self, gate_up: list[QuantLinear], down: list[QuantLinear], hidden_act: str):
        super().__init__()
        from transformers.activations import ACT2FN

        self.gate_up = nn.ModuleList(gate_up)
        self.down = nn.ModuleList(down)
        self.num_experts = len(gate_up)
        self.hidden_act = hidden_act
        self.act_fn = ACT2FN[hidden_act]

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device: torch.device | str | None = None) -> QuantExperts:
        return cls([QuantLinear.from_spec(s, device) for s in spec["gate_up_proj"]],
                   [QuantLinear.from_spec(s, device) for s in spec["down_proj"]], spec["hidden_act"])

    def spec(self) -> dict[str, Any]:
        return {"kind": "experts", "hidden_act": self.hidden_act,
                "gate_up_proj": [m.spec() for m in self.gate_up], "down_proj": [m.spec() for m in self.down]}

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return routed_experts(hidden_states, top_k_index, top_k_weights, self.num_experts,
                              lambda e, x: self.gate_up[e](x), lambda e, x: self.down[e](x), self.act_fn)
