"""Quantizing the experts of mixture-of-experts layers (3-D `gate_up_proj` / `down_proj` parameters).

Each expert's two matrices are quantized like linears, with Hessians from the calibration tokens the
router sent to that expert (collected by running the layer's own routing through `routed_experts`).
An expert that received fewer tokens than `MIN_TOKENS_PER_INPUT` × its input width borrows the Hessian
averaged over all experts of the layer, and the log says so; the router stays unquantized.
"""

from __future__ import annotations

import logging
import types

import torch
from torch import nn

from ..nn.quant_experts import QuantExperts, routed_experts
from ..recipe import LayerRecipe
from .linear import LinearReport, quantize_linear

log = logging.getLogger(__name__)
EXPERT_MATRICES = ("gate_up_proj", "down_proj")
MIN_TOKENS_PER_INPUT = 0.5  # below this many routed tokens per input feature an expert's own Hessian is too thin


def is_experts(module: nn.Module) -> bool:
    """A transformers experts module: 3-D `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I)."""
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gu, nn.Parameter) and isinstance(dn, nn.Parameter) and gu.dim() == 3 and dn.dim() == 3


def layer_experts(layer: nn.Module) -> dict[str, nn.Module]:
    """The experts modules of a decoder layer, by relative name."""
    return {name: m for name, m in layer.named_modules() if is_experts(m)}


class ExpertHessians:
    """While installed, an experts module's forward accumulates Σ xxᵀ of each expert's two inputs."""

    def __init__(self, experts: nn.Module):
        self.module = experts
        e, two_i, h = experts.gate_up_proj.shape
        dev = experts.gate_up_proj.device
        self.sums = {"gate_up_proj": torch.zeros(e, h, h, dtype=torch.float64, device=dev),
                     "down_proj": torch.zeros(e, two_i // 2, two_i // 2, dtype=torch.float64, device=dev)}
        self.tokens = torch.zeros(e, dtype=torch.long)
        self._forward = experts.forward
        experts.forward = types.MethodType(self._recording_forward, experts)

    def _recording_forward(self, module, hidden, top_k_index, top_k_weights):
        def gate_up(e: int, x: torch.Tensor) -> torch.Tensor:
            flat = x.detach().to(torch.float64)
            self.sums["gate_up_proj"][e].addmm_(flat.T, flat)
            self.tokens[e] += x.shape[0]
            return nn.functional.linear(x, module.gate_up_proj[e])

        def down(e: int, x: torch.Tensor) -> torch.Tensor:
            flat = x.detach().to(torch.float64)
            self.sums["down_proj"][e].addmm_(flat.T, flat)
            return nn.functional.linear(x, module.down_proj[e])

        return routed_experts(hidden, top_k_index, top_k_weights, module.gate_up_proj.shape[0], gate_up, down,
                              module.act_fn)

    def hessians(self, which: str, where: str) -> list[torch.Tensor]:
        """Per expert: its own E[xxᵀ], or the layer's average where it saw too few tokens."""
        sums, n = self.sums[which], self.tokens
        shared = sums.sum(0) / max(int(n.sum()), 1)
        out = []
        for e in range(sums.shape[0]):
            if n[e] < MIN_TOKENS_PER_INPUT * sums.shape[1]:
                log.info("%s.%s[%d]: %d routed tokens, using the layer's shared expert Hessian", where, which, e,
                         int(n[e]))
                out.append(shared)
            else:
                out.append(sums[e] / n[e])
        return out

    def remove(self) -> None:
        self.module.forward = self._forward


def quantize_experts(name: str, experts: nn.Module, recipes: dict[str, LayerRecipe],
                     hessians: dict[str, list[torch.Tensor]] | None, act: str
                     ) -> tuple[QuantExperts, list[LinearReport]]:
    """Every expert's `gate_up_proj` and `down_proj` as QuantLinears (in `recipes[which]`); `act` is the
    model's hidden activation (config.hidden_act)."""
    mods: dict[str, list] = {"gate_up_proj": [], "down_proj": []}
    reports = []
    for which in mods:
        weight = getattr(experts, which)
        for e in range(weight.shape[0]):
            h = hessians[which][e] if hessians is not None else None
            module, report = quantize_linear(f"{name}.{which}.{e}", weight[e].detach(), h, recipes[which])
            mods[which].append(module)
            reports.append(report)
    return QuantExperts(mods["gate_up_proj"], mods["down_proj"], act), reports
