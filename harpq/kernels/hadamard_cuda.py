"""The randomized Hadamard side of power-of-two width in one launch (`cuda/hadamard.cu`).

`stages.apply_plan` takes it for a plan that is signs plus Sylvester stages (the RHT at n = 2^k) on fp16
CUDA rows of width 256–8192, from 9 rows on; everything else keeps the Triton stage kernels. One block
per row: at batch 16 a decode step ran 20 % faster with it (H200, quipsharp2), at batch 1 a transform took
6.0 µs in one block against 5.1 µs in two launches spread over the GPU, so a few rows keep the stages.
HARPQ_HADAMARD_KERNEL=0 turns it off (to compare).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from . import nvrtc

SOURCE, ENTRY = "hadamard.cu", "harpq_hadamard"
MIN_N, MAX_N = 256, 8192
MIN_ROWS = 9


def usable(rows: torch.Tensor) -> bool:
    n = rows.shape[-1]
    if os.environ.get("HARPQ_HADAMARD_KERNEL", "1") == "0":
        return False
    return rows.is_cuda and rows.dtype == torch.float16 and MIN_N <= n <= MAX_N and n & (n - 1) == 0 \
        and rows.shape[0] >= MIN_ROWS and nvrtc.available() is None


@torch.library.custom_op("harpq::hadamard_rows", mutates_args=())
def hadamard_rows(x: torch.Tensor, signs: torch.Tensor, transpose: bool) -> torch.Tensor:
    """x (B, n) fp16, signs (n,) float32 -> H (s ⊙ x) / √n, or s ⊙ (H x) / √n when transposed."""
    x = x.contiguous()
    rows, n = x.shape
    y = torch.empty_like(x)
    if rows == 0:
        return y
    device = x.device.index or 0
    kern = nvrtc.kernel(SOURCE, ENTRY, (), device)
    nvrtc.launch(kern, rows, min(n // 8, 1024), nvrtc.ptr(x), nvrtc.ptr(signs), nvrtc.ptr(y), np.int32(n),
                 np.int32(n.bit_length() - 1), np.int32(int(transpose)))
    return y


@hadamard_rows.register_fake
def _(x, signs, transpose):
    return torch.empty_like(x)
