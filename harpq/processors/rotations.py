"""Fixed random incoherence processors: the randomized Hadamard transform and QuIP's Kronecker rotations.

Both are a Side on each dimension: Q_out = Uᵀ on the m outputs, Q_in = Vᵀ on the n inputs, so
W̃ = Q_out W Q_inᵀ, H̃ = Q_in H Q_inᵀ and y = Q_outᵀ Ŵ̃ Q_in x. The output side is seeded per
module; the input side by `input_seed`, which the pipeline sets per distinct layer input, so that
q/k/v (and gate/up) share one input transform that run time can apply once.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Processor
from .sides import Buffers, KroneckerSide, Side, block_hadamard, hadamard_or_fft, side_from_spec


class TwoSided(Processor):
    def __init__(self, seed: int = 0, input_seed: int | None = None, sides: dict[str, dict] | None = None):
        self.seed = seed
        self.input_seed = seed if input_seed is None else input_seed
        self.sides = dict(sides or {})
        self._bound: dict[str, Side] = {}

    def new_side(self, n: int) -> Side:
        raise NotImplementedError

    def side_from_spec(self, n: int, spec: dict[str, Any]) -> Side:
        return side_from_spec(n, spec)

    def side(self, which: str, n: int) -> Side:
        bound = self._bound.get(which)
        if bound is None or bound.n != n:
            bound = self.side_from_spec(n, self.sides[which]) if which in self.sides else self.new_side(n)
            self._bound[which] = bound
            self.sides[which] = bound.spec()
        return bound

    def config(self) -> dict[str, Any]:
        cfg = {"name": self.name, "seed": self.seed, "input_seed": self.input_seed}
        if self.sides:
            cfg["sides"] = dict(self.sides)
        return cfg

    def buffer_specs(self, out_features: int, in_features: int):
        return {**self.side("out", out_features).buffer_specs("u_"), **self.side("in", in_features).buffer_specs("v_")}

    def init_buffers(self, out_features: int, in_features: int) -> Buffers:
        out = self.side("out", out_features).init("u_", torch.Generator().manual_seed(self.seed))
        inp = self.side("in", in_features).init("v_", torch.Generator().manual_seed(self.input_seed))
        return {**out, **inp}

    def transform_weight(self, buffers: Buffers, weight: torch.Tensor) -> torch.Tensor:
        m, n = weight.shape
        cols = self.side("out", m).forward(buffers, "u_", weight.T).T  # Q_out W
        return self.side("in", n).forward(buffers, "v_", cols)  # (Q_out W) Q_inᵀ, row by row

    def transform_hessian(self, buffers: Buffers, hessian: torch.Tensor) -> torch.Tensor:
        side = self.side("in", hessian.shape[0])
        return side.forward(buffers, "v_", side.forward(buffers, "v_", hessian).T)

    def apply_input(self, buffers: Buffers, x: torch.Tensor) -> torch.Tensor:
        return self.side("in", x.shape[-1]).forward(buffers, "v_", x)

    def apply_output(self, buffers: Buffers, y: torch.Tensor) -> torch.Tensor:
        return self.side("out", y.shape[-1]).backward(buffers, "u_", y)

    def input_side(self, in_features: int) -> tuple[dict[str, Any], list[str]]:
        side = self.side("in", in_features)
        return {"processor": self.name, **side.spec()}, list(side.buffer_specs("v_"))

    def kernel_sides(self, buffers: Buffers, out_features: int, in_features: int):
        forms = []
        for which, n, prefix, transpose in (("out", out_features, "u_", True), ("in", in_features, "v_", False)):
            side = self.side(which, n)
            form = side.kernel_form(transpose)  # the output side is applied as U = Q_outᵀ
            if form is not None:
                form = (prefix + "signs", *form, side.run_stages(buffers, prefix, transpose))
            forms.append(form)
        return tuple(forms)

    def stage_plans(self, buffers: Buffers, out_features: int, in_features: int):
        from ..kernels.stages import StagePlan

        out = self.side("out", out_features).stages(buffers, "u_")
        inp = self.side("in", in_features).stages(buffers, "v_")
        if out is None or inp is None:
            return None
        return StagePlan.build(*out), StagePlan.build(*inp)


class RandomizedHadamard(TwoSided):
    """QuIP#'s RHT: random signs then H_K ⊗ H_{2^k}; the randomized FFT where no Hadamard order fits."""

    name = "rht"

    def new_side(self, n: int) -> Side:
        return hadamard_or_fft(n)


class BlockHadamard(TwoSided):
    """The RHT restricted to blocks: random signs, then H_b on each run of b entries (b = `block`, 128 by
    default, or the largest power of two dividing the width where b does not)."""

    name = "rht-block"

    def __init__(self, seed: int = 0, input_seed: int | None = None, sides: dict[str, dict] | None = None,
                 block: int = 128):
        super().__init__(seed, input_seed, sides)
        self.block = block

    def new_side(self, n: int) -> Side:
        return block_hadamard(n, self.block)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "block": self.block}


class KroneckerOrthogonal(TwoSided):
    """QuIP's incoherence processing: (A ⊗ B)·P with Haar-random A, B of near-square sizes."""

    name = "kron"

    def new_side(self, n: int) -> Side:
        return KroneckerSide(n)
