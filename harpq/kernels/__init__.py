"""Triton kernels for the run-time path (decode GEMV per codebook), registered as torch custom ops.

Each kernel has a PyTorch oracle (the codebook's `decode` followed by a matmul) it is tested against, on
the CPU through Triton's interpreter (`TRITON_INTERPRET=1`) and on CUDA. `available()` says whether a
kernel may run for a tensor: Triton importable, and the tensor on CUDA (or the interpreter switched on).
"""

from __future__ import annotations

import os

import torch


def available(x: torch.Tensor) -> bool:
    """Triton importable, and x on CUDA or the interpreter on (`TRITON_INTERPRET=1`)."""
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
