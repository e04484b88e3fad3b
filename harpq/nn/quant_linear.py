"""QuantLinear: a drop-in nn.Linear whose weight is stored as packed codes plus processor parameters.

Its storage format is fixed at construction, so `.to(dtype)` / `.half()` move it between devices but
never recast its buffers (a bf16 cast of fp16 scales would silently change the model). The product with
the stored matrix runs on whichever backend of the format can take the call (`kernels.select`: the CUDA
decode GEMVs for batch 1–16 on a GPU, the PyTorch reference elsewhere).
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import kernels
from ..codebooks import Codebook, saved_codebook
from ..formats import stored_bits
from ..processors import Processor, make_processor

if TYPE_CHECKING:
    from ..kernels.block_sides import BlockSide

log = logging.getLogger(__name__)
#: share of the machine's memory the dense copies of quantized weights may take on the CPU
DENSE_CACHE_SHARE = 0.5
_dense_cached = {"bytes": 0, "said": False}


def _release(nbytes: int) -> None:
    _dense_cached["bytes"] -= nbytes


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def view_stacked(mods: list[QuantLinear], stacked: dict[str, torch.Tensor]) -> None:
    """Make each member's tensor a view of its part of the stacked one, for the tensors its format stacks
    as a plain concatenation along dim 0 (`StorageFormat.row_concatenated`); the rest stay the members' own."""
    for name in mods[0].format.row_concatenated():
        start = 0
        for mod in mods:
            rows = getattr(mod, name).shape[0]
            setattr(mod, name, stacked[name][start:start + rows])
            start += rows


class QuantLinear(nn.Module):
    """y = U · decode(codes) · (Vᵀ x) + b, with U, V from the processor.

    On the CPU the weight U Ŵ̃ Vᵀ is decoded once and kept (while the dense copies stay under
    `DENSE_CACHE_SHARE` of memory; past that, decoded per call, and the log says so), so evaluating a
    quantized model costs what the FP model does. The stored codes stay the source of truth."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        codebook: Codebook,
        processor: Processor,
        bias: bool = False,
        device: torch.device | str | None = None,
        input_side_from: str | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.codebook = codebook
        self.format = codebook.storage
        self.processor = processor
        self._codebook_names = list(codebook.buffer_specs(out_features, in_features))
        self._processor_names = list(processor.buffer_specs(out_features, in_features))
        #: the module (full name) whose input side this one applies and does not store itself
        self.input_side_from = input_side_from
        borrowed = set(self.input_side_names()) if input_side_from else set()
        for name, (shape, dtype) in self._specs().items():
            # a borrowed side is a placeholder until `take_input_side` ties it (never on the meta device, which
            # loaders fill only for what the checkpoint holds)
            at = "cpu" if name in borrowed and torch.device(device or "cpu").type == "meta" else device
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=at), persistent=name not in borrowed)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        #: run-time kernels for ≤ 16 rows: None = where they can run; False = always the PyTorch reference;
        #: True also runs the Triton transform kernels off CUDA (on the CPU: TRITON_INTERPRET=1, tests)
        self.use_kernels: bool | None = None
        self._kernel_meta: dict[tuple[torch.device, str], tuple[tuple, tuple]] = {}
        self._fused_sides: dict[torch.device, tuple[tuple, tuple]] = {}
        self._dense: dict[tuple[torch.device, torch.dtype], tuple[tuple, torch.Tensor]] = {}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device: torch.device | str | None = None) -> QuantLinear:
        """Build an empty module from the per-module entry of a saved `quantization_config`."""
        return cls(
            spec["in_features"],
            spec["out_features"],
            saved_codebook(spec["codebook"]),
            make_processor(spec["processor"]),
            bias=spec.get("bias", False),
            device=device,
            input_side_from=spec.get("input_side_from"),
        )

    @classmethod
    def stack(cls, mods: list[QuantLinear]) -> QuantLinear | None:
        """One module computing the outputs of `mods` (which read the same input) stacked, as fast engines
        fuse q/k/v and gate/up; None where they cannot share one matrix (processors, per-matrix scales,
        different formats). The originals' codes and scales become views of the stacked ones."""
        first = mods[0]
        if any(type(m) is not cls for m in mods) or any(m.processor.config()["name"] != "none" for m in mods):
            return None
        if any(m.in_features != first.in_features or m.format.config() != first.format.config()
               or (m.bias is None) != (first.bias is None) for m in mods):
            return None
        parts = [(m._buffers_of(m._codebook_names), m.out_features) for m in mods]
        stacked = first.format.concat_rows(parts, first.in_features)
        rows = sum(m.out_features for m in mods)
        specs = first.codebook.buffer_specs(rows, first.in_features)
        if stacked is None or any(stacked[k].shape != specs[k][0] for k in stacked):  # e.g. scales become per row
            return None
        device = first.codes_device()
        fused = cls(first.in_features, rows, first.codebook, first.processor, first.bias is not None, device=device)
        fused.load_quantized(stacked, torch.cat([m.bias.data for m in mods]) if first.bias is not None else None)
        view_stacked(mods, fused._buffers_of(list(stacked)))
        fused.use_kernels = first.use_kernels
        return fused

    def spec(self) -> dict[str, Any]:
        out = {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "codebook": self.codebook.config(),
            "processor": self.processor.config(),
        }
        if self.input_side_from:
            out["input_side_from"] = self.input_side_from
        return out

    def input_side_names(self) -> list[str]:
        """The buffers of the processor's input side V (none for processors without one)."""
        side = self.processor.input_side(self.in_features)
        return [] if side is None else list(side[1])

    def take_input_side(self, leader: QuantLinear, leader_name: str, equal_values: bool = True) -> None:
        """Apply `leader`'s input side as this module's own, holding its tensors instead of a copy: the side is
        then stored once, with the leader, and counted once in bits per weight. The two sides must be of one
        kind and, unless `equal_values` is off (loading a checkpoint that holds the side once; a benchmark's
        random model), equal as `shares_input_side` says."""
        mine, theirs = self.processor.input_side(self.in_features), leader.processor.input_side(leader.in_features)
        same = self.shares_input_side(leader) if equal_values else \
            mine is not None and theirs is not None and mine[0] == theirs[0] and self.in_features == leader.in_features
        if leader is self or not same:
            raise ValueError(f"{leader_name} does not apply the same input side as this module")
        self.input_side_from = leader_name
        for name in self.input_side_names():
            self._buffers[name] = leader._buffers[name]
            self._non_persistent_buffers_set.add(name)

    def load_quantized(self, buffers: dict[str, torch.Tensor], bias: torch.Tensor | None = None) -> QuantLinear:
        for name, tensor in buffers.items():
            current = getattr(self, name)
            if current.shape != tensor.shape or current.dtype != tensor.dtype:
                raise ValueError(f"buffer {name}: got {tuple(tensor.shape)} {tensor.dtype}, "
                                 f"expected {tuple(current.shape)} {current.dtype}")
            current.copy_(tensor)
        if bias is not None:
            self.bias.data.copy_(bias)
        return self

    def _buffers_of(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in names}

    def dequantized_weight(self) -> torch.Tensor:
        """The processed-domain weight Ŵ̃ in float32."""
        return self.codebook.decode(self._buffers_of(self._codebook_names), self.out_features, self.in_features)

    def effective_weight(self) -> torch.Tensor:
        """U Ŵ̃ Vᵀ: the dense weight this module applies, in float32 (for tests and export)."""
        pb = self._buffers_of(self._processor_names)
        eye = torch.eye(self.in_features, dtype=torch.float32, device=self.codes_device())
        rows = self.processor.apply_input(pb, eye) @ self.dequantized_weight().T  # row i: (Ŵ̃ Vᵀ e_i)ᵀ
        return self.processor.apply_output(pb, rows).T

    def codes_device(self) -> torch.device:
        return next(iter(self._buffers.values())).device

    def _transform_kernels(self, rows: torch.Tensor) -> bool:
        """Whether the online transforms run as Triton stage kernels for these rows."""
        if self.use_kernels is False or rows.shape[0] > kernels.MAX_DECODE_BATCH:
            return False
        return kernels.triton_available(rows) and (rows.is_cuda or self.use_kernels is True)

    def _run_meta(self, device: torch.device, backend: kernels.GemvBackend, plans_wanted: bool):
        """(the backend's prepared tensors, processor stage plans or None), rebuilt when a buffer changes."""
        cb = self._buffers_of(self._codebook_names)
        pb = self._buffers_of(self._processor_names)
        version = tuple((t.data_ptr(), t._version) for t in (*cb.values(), *pb.values()))
        key = (device, backend.name if not plans_wanted else backend.name + "+plans")
        hit = self._kernel_meta.get(key)
        if hit is None or hit[0] != version:
            plans = self.processor.stage_plans(pb, self.out_features, self.in_features) if plans_wanted else None
            prepared = backend.prepare(self.format, cb, self.out_features, self.in_features)
            hit = self._kernel_meta[key] = (version, (prepared, plans))
        return hit[1]

    def _buffer_version(self) -> tuple:
        return tuple((t.data_ptr(), t._version) for t in self._buffers.values() if t is not None)

    def _dense_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        """U Ŵ̃ Vᵀ in x's dtype, decoded once per buffer version while memory allows (CPU only)."""
        if x.device.type != "cpu":
            return None
        key, version = (x.device, x.dtype), self._buffer_version()
        hit = self._dense.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
        nbytes = self.in_features * self.out_features * x.element_size()
        budget = _memory_bytes()
        if hit is None and budget is not None and _dense_cached["bytes"] + nbytes > DENSE_CACHE_SHARE * budget:
            if not _dense_cached["said"]:
                _dense_cached["said"] = True
                log.warning("dense copies of quantized weights would pass %.0f %% of memory: decoding per call",
                            100 * DENSE_CACHE_SHARE)
            return None
        dense = self.effective_weight().to(x.dtype)
        if hit is None:
            _dense_cached["bytes"] += nbytes
            weakref.finalize(self, _release, nbytes)
        self._dense[key] = (version, dense)
        return dense

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """y = U Ŵ̃ Vᵀ x + b (+ residual: a decoder layer's skip connection, fused into the kernel's store
        where there is no output transform or bias)."""
        dense = self._dense_weight(x) if self.use_kernels is not True else None
        if dense is not None:
            y = torch.nn.functional.linear(x, dense, None if self.bias is None else self.bias.to(x.dtype))
            return y if residual is None else residual + y
        rows = x.reshape(-1, self.in_features)
        context = self._run_context(rows)  # the rotated rows have the same shape, dtype and device
        return self.from_rotated(self.rotate_input(rows, context), x.shape[:-1], residual, context)

    def glu(self, x: torch.Tensor, norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
        """silu(gate) · up, shaped (…, F), for a stacked [gate; up] matrix (out_features = 2F) and input x, or
        RMSNorm(x) with norm = (weight, eps) (Llama's): one kernel where the backend `folds_glu` (the norm in it
        too where it `folds_norm`), else the norm, the GEMV and the MLP's SiLU·up in turn."""
        f = self.out_features // 2
        if x.is_cuda and self.use_kernels is not False and self.bias is None \
                and self.processor.config()["name"] == "none":
            rows = x.reshape(-1, self.in_features)
            backend, prepared, _ = self._run_context(rows)
            if backend.folds_glu(rows, self.out_features):
                extra: dict[str, Any] = {"glu": True}
                if norm is not None and backend.folds_norm(rows):
                    extra["norm"] = norm
                elif norm is not None:
                    rows = _rms_norm(rows, norm)
                z = backend.matmul(self.format, self._buffers_of(self._codebook_names), prepared, rows,
                                   self.out_features, self.in_features, **extra)
                return z.view(*x.shape[:-1], f)
        from ..kernels.fused import silu_mul

        gate, up = self(x if norm is None else _rms_norm(x, norm)).split(f, dim=-1)
        return silu_mul(gate, up, x.is_cuda and kernels.triton_available(x))

    def shares_input_side(self, other: QuantLinear) -> bool:
        """Whether `other` applies the same input transform Vᵀ (same kind, same parameters): then linears that
        read one input need it once (`SharedInput`)."""
        mine, theirs = self.processor.input_side(self.in_features), other.processor.input_side(other.in_features)
        if mine is None or theirs is None or mine[0] != theirs[0] or self.in_features != other.in_features:
            return False
        return all(torch.equal(getattr(self, k), getattr(other, k)) for k in mine[1])

    def kernel_sides(self, device: torch.device) -> tuple[BlockSide | None, BlockSide | None]:
        """(output side, input side) as the decode engine's fused kernels take them (`kernels.block_sides`),
        each None where the side is not (A ⊗ H_b)·diag(s) with a block and A those kernels hold. Built once
        per device and buffer version (so a captured CUDA graph copies nothing)."""
        version = self._buffer_version()
        hit = self._fused_sides.get(device)
        if hit is None or hit[0] != version:
            from ..kernels.block_sides import BlockSide

            forms = self.processor.kernel_sides(self._buffers_of(self._processor_names), self.out_features,
                                                self.in_features)
            sides = tuple(None if f is None else BlockSide.build(getattr(self, f[0]).to(device), *f[1:])
                          for f in forms)
            hit = self._fused_sides[device] = (version, sides)
        return hit[1]

    def matmul_rotated(self, rows: torch.Tensor) -> torch.Tensor:
        """Ŵ̃ · rows for rows = Vᵀ x (N, in_features): the stored matrix alone, no output side or bias (the
        caller applies them, fused into its own kernels)."""
        backend = kernels.select(self.format, rows, self.out_features, self.in_features,
                                 fast=self.use_kernels is not False)
        prepared, _ = self._run_meta(rows.device, backend, False)
        return backend.matmul(self.format, self._buffers_of(self._codebook_names), prepared, rows,
                              self.out_features, self.in_features)

    def _run_context(self, rows: torch.Tensor):
        """(backend, its prepared tensors, stage plans or None) for a call on `rows`."""
        staged = self._transform_kernels(rows)
        backend = kernels.select(self.format, rows, self.out_features, self.in_features,
                                 fast=self.use_kernels is not False)
        prepared, plans = self._run_meta(rows.device, backend, staged)
        return backend, prepared, plans

    def rotate_input(self, rows: torch.Tensor, context=None) -> torch.Tensor:
        """Vᵀ x for rows (N, in_features); `context`: `_run_context(rows)` where the caller has it."""
        _, _, plans = context or self._run_context(rows)
        if plans:
            from ..kernels.stages import apply_plan

            return apply_plan(plans[1], rows, False)
        return self.processor.apply_input(self._buffers_of(self._processor_names), rows)

    def rotate_output(self, z: torch.Tensor, context=None) -> torch.Tensor:
        """U z for rows z = Ŵ̃ Vᵀ x (N, out_features)."""
        _, _, plans = context or self._run_context(z)
        if plans:
            from ..kernels.stages import apply_plan

            return apply_plan(plans[0], z, True)
        return self.processor.apply_output(self._buffers_of(self._processor_names), z)

    def from_rotated(self, rows: torch.Tensor, lead: torch.Size | tuple[int, ...],
                     residual: torch.Tensor | None = None, context=None) -> torch.Tensor:
        """U Ŵ̃ rows + b (+ residual) for rows = Vᵀ x (N, in_features), shaped (*lead, out_features)."""
        m, n = self.out_features, self.in_features
        backend, prepared, plans = context or self._run_context(rows)
        fuse = residual is not None and self.bias is None and self.processor.config()["name"] == "none" \
            and residual.dtype == rows.dtype
        z = backend.matmul(self.format, self._buffers_of(self._codebook_names), prepared, rows, m, n,
                           residual.reshape(-1, m) if fuse else None)
        y = self.rotate_output(z, (backend, prepared, plans)).view(*lead, m)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if residual is not None and not fuse:
            y = residual + y
        return y

    def stored_bits(self) -> int:
        """Every stored bit: codes, scales, zero-points and processor parameters (bias excluded; an input side
        taken from another module is that module's)."""
        borrowed = set(self.input_side_names()) if self.input_side_from else set()
        return stored_bits({k: v for k, v in self._specs().items() if k not in borrowed})

    def _specs(self):
        m, n = self.out_features, self.in_features
        return {**self.codebook.buffer_specs(m, n), **self.processor.buffer_specs(m, n)}

    def _apply(self, fn, recurse=True):
        # Buffers follow device moves only: fn is probed on an empty tensor to learn the target device.
        stored = {k: b for k, b in self._buffers.items() if b is not None}
        for k in stored:
            self._buffers[k] = None
        super()._apply(fn, recurse)
        for k, b in stored.items():
            device = fn(torch.empty(0, dtype=b.dtype, device=b.device)).device
            self._buffers[k] = b.to(device)
        return self

    def extra_repr(self) -> str:
        cb = self.codebook.config()
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"codebook={cb}, processor={self.processor.config()['name']}")


def _rms_norm(x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
    """RMSNorm(x) with norm = (weight, eps), by the decode step's own kernel where it can run."""
    from ..kernels.fused import rms_norm

    return rms_norm(x, norm[0], norm[1], x.is_cuda and kernels.triton_available(x))
