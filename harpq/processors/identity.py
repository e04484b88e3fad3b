"""No incoherence processing: U = V = I (RTN, GPTQ, HQQ)."""

from __future__ import annotations

from typing import Any

import torch

from .base import Processor


class Identity(Processor):
    name = "none"

    def config(self) -> dict[str, Any]:
        return {"name": self.name}

    def transform_weight(self, buffers: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        return weight

    def transform_hessian(self, buffers: dict[str, torch.Tensor], hessian: torch.Tensor) -> torch.Tensor:
        return hessian

    def apply_input(self, buffers: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return x

    def apply_output(self, buffers: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        return y
