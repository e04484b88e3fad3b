"""Proxy Hessians H = E[xxᵀ] of a decoder layer's linear inputs, accumulated in float64.

Linears that read the very same tensor in a forward pass (q/k/v, gate/up) share one Hessian; the
grouping is found by watching the forward pass, not from module names, so any architecture works.
"""

from __future__ import annotations

import torch
from torch import nn


class HessianCollector:
    """Forward pre-hooks that accumulate Σ xxᵀ per distinct input; call `end_pass()` after each batch."""

    def __init__(self, linears: dict[str, nn.Linear]):
        self.group_of: dict[str, str] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._seen: dict[int, tuple[str, torch.Tensor]] = {}
        self._handles = [m.register_forward_pre_hook(self._hook_for(name)) for name, m in linears.items()]

    def _hook_for(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            seen = self._seen.get(id(x))
            if seen is not None and seen[1] is x:
                self.group_of.setdefault(name, seen[0])
                return
            self.group_of.setdefault(name, name)
            leader = self.group_of[name]
            self._seen[id(x)] = (leader, x)
            flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
            if leader not in self.sums:
                self.sums[leader] = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64, device=x.device)
                self.counts[leader] = 0
            self.sums[leader].addmm_(flat.T, flat)
            self.counts[leader] += flat.shape[0]

        return hook

    def end_pass(self) -> None:
        self._seen.clear()

    def hessian(self, name: str) -> torch.Tensor:
        leader = self.group_of[name]
        return self.sums[leader] / self.counts[leader]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._seen.clear()
