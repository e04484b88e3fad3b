"""Fast orthonormal Hadamard transforms for n = K · 2^k: FWHT over the 2^k axis, dense K×K over the other.

The matrix applied is H_n = (H_K ⊗ H_{2^k}) / √n, K the slow index (as QuIP#). Cost O(n log n + nK)
per vector; the n×n matrix is never built.
"""

from __future__ import annotations

import math

import torch

from ..errors import HarpqError
from .construct import hadamard_matrix, split_order, sylvester

_DENSE: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def supports(n: int) -> bool:
    return split_order(n) is not None


FWHT_RADIX = 64  # Sylvester H_{2^k} = H_64 ⊗ H_64 ⊗ …: one small matmul per stage, few passes over memory


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Sylvester–Walsh–Hadamard transform over the last dim (a power of two)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"FWHT needs a power of two, not {n}")
    lead = x.shape[:-1]
    stride = 1
    while stride < n:
        radix = min(FWHT_RADIX, n // stride)
        h = _sylvester(radix, x.dtype, x.device)
        x = torch.matmul(h, x.reshape(*lead, n // (radix * stride), radix, stride))
        stride *= radix
    return x.reshape(*lead, n)


def _sylvester(k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (-k, dtype, device)  # negative keys: Sylvester factors, beside the dense K×K factors
    if key not in _DENSE:
        _DENSE[key] = torch.from_numpy(sylvester(k)).to(device=device, dtype=dtype)
    return _DENSE[key]


def dense_factor(k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (k, dtype, device)
    if key not in _DENSE:
        _DENSE[key] = torch.from_numpy(hadamard_matrix(k).copy()).to(device=device, dtype=dtype)
    return _DENSE[key]


def hadamard_transform(x: torch.Tensor, transpose: bool = False, k: int | None = None) -> torch.Tensor:
    """H_n x (or H_nᵀ x) for every vector x along the last dim; `k` pins the dense factor's order."""
    n = x.shape[-1]
    if k is None:
        split = split_order(n)
        if split is None:
            raise HarpqError(f"no Hadamard matrix of order {n} = K·2^k is known here (use the FFT processor)")
        k = split[0]
    p = n // k
    if k * p != n or p & (p - 1) or hadamard_matrix(k) is None:
        raise HarpqError(f"cannot split {n} as {k}·2^j with a known Hadamard matrix of order {k}")
    y = fwht(x.reshape(*x.shape[:-1], k, p))
    if k > 1:
        h = dense_factor(k, x.dtype, x.device)
        y = torch.einsum("ji,...jp->...ip" if transpose else "ij,...jp->...ip", h, y)
    return y.reshape(x.shape) / math.sqrt(n)


def hadamard_matrix_tensor(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The dense orthonormal H_n (for tests and references only)."""
    return hadamard_transform(torch.eye(n, dtype=dtype)).T
