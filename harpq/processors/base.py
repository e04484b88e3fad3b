"""The processor interface: an orthogonal pair (U on outputs, V on inputs) around the quantized matrix.

Quantization sees W̃ = Uᵀ W V and H̃ = Vᵀ H V; at run time y = U · Ŵ̃ · (Vᵀ x). Without quantization this
is exactly the original layer, which the tests check in float64.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from ..codebooks import Codebook
from ..formats import BufferSpec

#: (signs buffer name, block b, A: the ±1 matrix over runs of b entries, or None for the identity)
#: (signs buffer, block b, A or None, learned stages inside the runs or None): see `Processor.kernel_sides`
KernelForm = tuple[str, int, "torch.Tensor | None", "tuple[list[int], torch.Tensor] | None"]


class Processor(ABC):
    """A two-sided orthogonal transform with its parameters stored as tensors."""

    name: str
    #: fitted per module: the pipeline then rounds both the start and the fitted parameters, keeps the better
    learnable: bool = False

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Everything `make_processor` needs to rebuild this processor (JSON-serialisable)."""

    def buffer_specs(self, out_features: int, in_features: int) -> BufferSpec:
        """Name -> (shape, dtype) of the tensors the processor stores in a `QuantLinear`."""
        return {}

    def init_buffers(self, out_features: int, in_features: int) -> dict[str, torch.Tensor]:
        """Fresh (e.g. seeded random) parameters for a new layer."""
        return {}

    def fit(
        self,
        buffers: dict[str, torch.Tensor],
        weight: torch.Tensor,
        hessian: torch.Tensor | None,
        codebook: Codebook,
    ) -> dict[str, torch.Tensor]:
        """Learnable processors tune their parameters here; fixed ones return them unchanged."""
        return buffers

    @abstractmethod
    def transform_weight(self, buffers: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        """W -> Uᵀ W V."""

    @abstractmethod
    def transform_hessian(self, buffers: dict[str, torch.Tensor], hessian: torch.Tensor) -> torch.Tensor:
        """H -> Vᵀ H V."""

    @abstractmethod
    def apply_input(self, buffers: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """x -> Vᵀ x over the last dim."""

    @abstractmethod
    def apply_output(self, buffers: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """y -> U y over the last dim."""

    def input_side(self, in_features: int) -> tuple[dict[str, Any], list[str]] | None:
        """(what the input side V is, the names of its buffers): modules with equal specs and equal buffers
        apply the same Vᵀ x, so linears reading one input can apply it once. None: no input side."""
        return None

    def kernel_sides(self, buffers: dict[str, torch.Tensor], out_features: int,
                     in_features: int) -> tuple[KernelForm | None, KernelForm | None]:
        """(output side U, input side Vᵀ) each as (signs buffer, block b, A or None, stages or None) with the
        side = (A ⊗ H_b)·diag(signs) in the direction it is applied (`Side.kernel_form`), or, where stages are
        given (`Side.run_stages`: radices and blocks), diag(signs) then those stages inside each run of b in
        place of H_b: the decode engine then applies it inside its own kernels. None for a side of neither form."""
        return None, None

    def stage_plans(self, buffers: dict[str, torch.Tensor], out_features: int, in_features: int):
        """(output side, input side) as `kernels.stages.StagePlan`s for the run-time kernels, or None where
        the transform is not a product of block stages (then `apply_input`/`apply_output` run)."""
        return None
