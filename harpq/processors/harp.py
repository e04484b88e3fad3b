"""HARP: a learnable two-sided butterfly processor that starts at the randomized Hadamard transform.

Each side is Q = B_T ⋯ B_1 · diag(signs): the RHT's random signs, then mixed-radix butterfly stages
whose blocks are Cayley(S)·M (see `butterfly`). Two schedules:

- `greedy`: radix 8 first, then the largest factor ≤ 8, a leftover prime as one stage; at S = 0 this
  is exactly the RHT for powers of two, a fixed random orthogonal start otherwise.
- `kron`: greedy stages over the 2^j part of n = K·2^j, then the fixed H_K of the Hadamard library as
  the last stage; at S = 0 this is exactly the RHT (`rht`) for every size it supports.
- `block`: greedy stages inside each run of b = 128 entries (or the largest power of two below that divides
  n), nothing across runs; at S = 0 this is exactly `rht-block`, and every side stays local to its runs (what
  lets a kernel that holds 128 entries apply it).

`fit` learns S per module on the layer's Hessian and the target codebook (`harp_fit`); the stored
parameters are the strictly-upper entries of every S (fp16, or int8 with an fp16 scale per block), and
the transform is rebuilt from them in float64, so what was quantized is what runs.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..codebooks import Codebook
from ..errors import HarpqError
from ..formats import BufferSpec
from ..hadamard import split_order
from ..hadamard.transform import dense_factor
from .butterfly import PREFERRED_RADIX, apply_stages, check_schedule, greedy_schedule, stage_kernels
from .rotations import TwoSided
from .sides import Buffers, Side, block_size, random_signs, side_from_spec

SCHEDULES = ("greedy", "kron", "block")
BLOCK = 128  # run length of the `block` schedule
STORAGE = ("fp16", "int8")


class ButterflySide(Side):
    """Q = B_T ⋯ B_1 · diag(signs); with `fixed_k` > 1 the last stage is the fixed orthonormal H_K; with `block`
    > 0 the stages factor `block` and act inside each run of that many entries (a block-diagonal Q)."""

    kind = "butterfly"

    def __init__(self, n: int, schedule: list[int], fixed_k: int = 1, store: str = "fp16", block: int = 0):
        super().__init__(n)
        if block and (n % block or fixed_k > 1):
            raise HarpqError(f"butterfly runs of {block} need a width they divide (not {n}) and no fixed stage")
        check_schedule(block or n, schedule)
        self.block = block
        if fixed_k > 1 and schedule[-1] != fixed_k:
            raise HarpqError(f"the fixed Hadamard stage of order {fixed_k} must be the last of {schedule}")
        if store not in STORAGE:
            raise HarpqError(f"unknown HARP parameter storage {store!r} (offered: {', '.join(STORAGE)})")
        self.schedule, self.fixed_k, self.store = list(schedule), fixed_k, store
        self.learned = list(range(len(schedule) - (1 if fixed_k > 1 else 0)))
        self._cache: dict[Any, tuple[Any, list[torch.Tensor]]] = {}

    def spec(self) -> dict[str, Any]:
        spec = {"kind": self.kind, "schedule": self.schedule, "fixed_k": self.fixed_k, "store": self.store}
        return {**spec, "block": self.block} if self.block else spec

    def param_shape(self, t: int) -> tuple[int, int]:
        b = self.schedule[t]
        return self.n // b, b * (b - 1) // 2

    def buffer_specs(self, prefix: str) -> BufferSpec:
        specs: BufferSpec = {prefix + "signs": ((self.n,), torch.float16)}
        for t in self.learned:
            shape = self.param_shape(t)
            if self.store == "fp16":
                specs[f"{prefix}theta{t}"] = (shape, torch.float16)
            else:
                specs[f"{prefix}theta{t}"] = (shape, torch.int8)
                specs[f"{prefix}theta{t}_scale"] = ((shape[0],), torch.float16)
        return specs

    def init(self, prefix: str, gen: torch.Generator) -> Buffers:
        out = {prefix + "signs": random_signs(self.n, gen)}  # the same draw as the RHT's side
        return {**out, **self.store_params(prefix, [torch.zeros(self.param_shape(t)) for t in self.learned])}

    def store_params(self, prefix: str, params: list[torch.Tensor]) -> Buffers:
        """Float parameters (one tensor per learnable stage) -> stored tensors (rounded to fp16 or int8)."""
        out: Buffers = {}
        for t, p in zip(self.learned, params, strict=True):
            p = p.detach().float()
            if self.store == "fp16":
                out[f"{prefix}theta{t}"] = p.half()
            else:
                scale = (p.abs().amax(1) / 127).half()
                safe = scale.float().clamp(min=torch.finfo(torch.float16).tiny)[:, None]
                out[f"{prefix}theta{t}"] = torch.round(p / safe).clamp(-127, 127).to(torch.int8)
                out[f"{prefix}theta{t}_scale"] = scale
        return out

    def load_params(self, b: Buffers, prefix: str, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """Stored tensors -> float parameters, one (D, b(b−1)/2) tensor per learnable stage."""
        params = []
        for t in self.learned:
            p = b[f"{prefix}theta{t}"].to(dtype)
            if self.store == "int8":
                p = p * b[f"{prefix}theta{t}_scale"].to(dtype)[:, None]
            params.append(p)
        return params

    def kernels(self, params: list[torch.Tensor], device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        """Per-stage blocks from float parameters (differentiable); the fixed H_K stage is one shared block."""
        ks = [stage_kernels(p.to(device=device, dtype=dtype), self.schedule[t])
              for t, p in zip(self.learned, params, strict=True)]
        if self.fixed_k > 1:
            k = self.fixed_k
            ks.append(dense_factor(k, torch.float64, torch.device("cpu")).to(device=device, dtype=dtype) / math.sqrt(k))
        return ks

    def _stored_kernels(self, b: Buffers, prefix: str, like: torch.Tensor) -> list[torch.Tensor]:
        """Blocks rebuilt in float64 from the stored parameters, cached until those tensors change."""
        names = sorted(k for k in b if k.startswith(prefix + "theta"))
        version = tuple((b[k].data_ptr(), b[k]._version) for k in names)
        key = (prefix, like.dtype, like.device)
        hit = self._cache.get(key)
        if hit is None or hit[0] != version:
            exact = self.kernels(self.load_params(b, prefix, torch.float64), like.device, torch.float64)
            hit = (version, [k.to(like.dtype) for k in exact])
            self._cache[key] = hit
        return hit[1]

    def apply(self, x: torch.Tensor, kernels: list[torch.Tensor], signs: torch.Tensor) -> torch.Tensor:
        """Q x along the last dim, for given stage blocks (the fitting loop passes differentiable ones)."""
        return apply_stages(x * signs.to(x.dtype), kernels, self.schedule)

    def forward(self, b: Buffers, prefix: str, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x, self._stored_kernels(b, prefix, x), b[prefix + "signs"])

    def backward(self, b: Buffers, prefix: str, x: torch.Tensor) -> torch.Tensor:
        ks = self._stored_kernels(b, prefix, x)
        return apply_stages(x, ks, self.schedule, transpose=True) * b[prefix + "signs"].to(x.dtype)

    def stages(self, b: Buffers, prefix: str) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
        signs = b[prefix + "signs"]
        return signs, self._stored_kernels(b, prefix, signs.new_empty(0, dtype=torch.float64)), self.schedule

    def kernel_form(self, transpose: bool) -> tuple[int, None] | None:
        """Runs of `block` entries, each through its own stages (`run_stages`); None for the full-width schedules."""
        return (self.block, None) if self.block else None

    def run_stages(self, b: Buffers, prefix: str, transpose: bool = False) -> tuple[list[int], torch.Tensor] | None:
        if not self.block:
            return None
        _, kernels, schedule = self.stages(b, prefix)
        if transpose:
            kernels = [k.transpose(-1, -2) for k in kernels]
        return list(schedule), torch.cat([k.float().reshape(-1) for k in kernels])


def butterfly_side(n: int, schedule: str, store: str = "fp16", radix: int = PREFERRED_RADIX) -> ButterflySide:
    if schedule == "greedy":
        return ButterflySide(n, greedy_schedule(n, radix), store=store)
    if schedule == "kron":
        split = split_order(n)
        if split is None:
            raise HarpqError(f"no Hadamard matrix of order K for {n} = K·2^j: use the greedy HARP schedule")
        k, p = split[0], n // split[0]
        stages = greedy_schedule(p, radix) if p > 1 else []
        return ButterflySide(n, stages + ([k] if k > 1 else []), fixed_k=k, store=store)
    if schedule == "block":
        b = block_size(n, BLOCK)
        return ButterflySide(n, greedy_schedule(b, radix), store=store, block=b)
    raise HarpqError(f"unknown HARP schedule {schedule!r} (offered: {', '.join(SCHEDULES)})")


class HARP(TwoSided):
    """Two-sided learnable butterfly processor; `fit` tunes it per module (see `harp_fit`)."""

    name = "harp"
    learnable = True

    def __init__(
        self,
        seed: int = 0,
        input_seed: int | None = None,
        sides: dict[str, dict] | None = None,
        schedule: str = "greedy",
        store: str = "fp16",
        steps: int = 1200,
        lr: float = 0.03,
        hbd_lambda: float = 0.1,
        hbd_max_n: int = 24672,
        seconds: float | None = None,
        refresh: int = 1,
    ):
        if schedule not in SCHEDULES:
            raise HarpqError(f"unknown HARP schedule {schedule!r} (offered: {', '.join(SCHEDULES)})")
        if store not in STORAGE:
            raise HarpqError(f"unknown HARP parameter storage {store!r} (offered: {', '.join(STORAGE)})")
        if steps < 0 or lr <= 0 or hbd_lambda < 0:
            raise HarpqError(f"HARP needs steps ≥ 0, lr > 0 and λ ≥ 0 (got {steps}, {lr}, {hbd_lambda})")
        if not isinstance(refresh, int) or refresh < 1:
            raise HarpqError(f"HARP's target refresh interval must be a whole number of steps ≥ 1, not {refresh}")
        if seconds is not None and not seconds >= 0:
            raise HarpqError(f"a HARP fit's time budget must be 0 or more seconds, not {seconds}")
        super().__init__(seed, input_seed, sides)
        self.schedule, self.store = schedule, store
        self.steps, self.lr, self.hbd_lambda, self.hbd_max_n = steps, lr, hbd_lambda, hbd_max_n
        self.seconds = seconds  # this module's share of the run's --harp-budget
        self.refresh = refresh
        self.last_fit: dict[str, Any] = {}

    def config(self) -> dict[str, Any]:
        cfg = {**super().config(), "schedule": self.schedule, "store": self.store, "steps": self.steps,
               "lr": self.lr, "hbd_lambda": self.hbd_lambda, "hbd_max_n": self.hbd_max_n}
        if self.refresh != 1:  # settings at their defaults stay out, so older checkpoints' configs still match
            cfg["refresh"] = self.refresh
        if self.seconds is not None:
            cfg["seconds"] = self.seconds
        return cfg

    def new_side(self, n: int) -> Side:
        return butterfly_side(n, self.schedule, self.store)

    def side_from_spec(self, n: int, spec: dict[str, Any]) -> Side:
        if spec["kind"] == ButterflySide.kind:
            return ButterflySide(n, spec["schedule"], spec["fixed_k"], spec["store"], spec.get("block", 0))
        return side_from_spec(n, spec)

    def fit(self, buffers: Buffers, weight: torch.Tensor, hessian: torch.Tensor | None, codebook: Codebook) -> Buffers:
        from .harp_fit import FitSettings, fit_two_sided

        m, n = weight.shape
        settings = FitSettings(self.steps, self.lr, self.hbd_lambda, self.hbd_max_n, self.seconds, self.refresh)
        fitted, self.last_fit = fit_two_sided(self.side("out", m), self.side("in", n), buffers, weight, hessian,
                                              codebook.fit_target(), settings)
        return fitted

    def fit_shared_input(self, buffers: list[Buffers], weights: list[torch.Tensor], hessian: torch.Tensor | None,
                         codebook: Codebook) -> list[Buffers]:
        """`fit` for linears that read one input: one input side fitted for all (see `harp_fit`)."""
        from .harp_fit import FitSettings, fit_shared_input

        n = weights[0].shape[1]
        settings = FitSettings(self.steps, self.lr, self.hbd_lambda, self.hbd_max_n, self.seconds, self.refresh)
        outs = [butterfly_side(w.shape[0], self.schedule, self.store) for w in weights]
        fitted, self.last_fit = fit_shared_input(outs, self.side("in", n), buffers, weights, hessian,
                                                 codebook.fit_target(), settings)
        return fitted
