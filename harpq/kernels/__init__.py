"""Run-time kernels: decode GEMVs per storage format (CUDA C++ through NVRTC, `backends` picks one per call,
the PyTorch reference everywhere else), and Triton kernels for the online transforms and the fused
decoder ops (RMSNorm, SiLU·up, RoPE + KV-cache write).

Each kernel has a PyTorch oracle it is tested against. Triton kernels also run on the CPU through Triton's
interpreter (`TRITON_INTERPRET=1`, tests); `triton_available()` says whether one may run for a tensor.
"""

from __future__ import annotations

import os

import torch

from . import e8p_cuda, scalar_cuda, trellis_cuda  # noqa: F401  (register their backends)
from .backends import MAX_DECODE_BATCH, GemvBackend, backends_for, register, select


def triton_available(x: torch.Tensor) -> bool:
    """Triton importable, and x on CUDA or the interpreter on (`TRITON_INTERPRET=1`)."""
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = ["MAX_DECODE_BATCH", "GemvBackend", "backends_for", "register", "select", "triton_available"]
