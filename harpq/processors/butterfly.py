"""Mixed-radix butterfly transforms: products of sparse block-orthogonal stages (HARP's structure).

A size n is factored n = b_1·b_2·…·b_T (the schedule). Index i of a vector is read as mixed-radix
digits, the first stage's digit fastest (stride 1), stage t's digit at stride b_1⋯b_(t−1)
(Cooley–Tukey order). Stage t multiplies that digit by one b_t×b_t matrix per value of the other digits:
n/b_t independent blocks, the n×n matrix is never built. With every block the normalised Sylvester
Hadamard the product is exactly the normalised Sylvester Hadamard H_n (the digits of a power of two
are groups of its bits, and H_n is the tensor product of per-bit H_2), whatever the schedule.

Each learnable block is Cayley(S)·M: S skew-symmetric (orthogonal for every S, the identity at S = 0)
times a fixed mixer M (Sylvester Hadamard for powers of two, a seeded random orthogonal matrix
otherwise).
"""

from __future__ import annotations

import math

import torch

from ..errors import HarpqError
from ..hadamard.construct import sylvester

PREFERRED_RADIX = 8


def greedy_schedule(n: int, radix: int = PREFERRED_RADIX) -> list[int]:
    """`radix` as often as it divides, then the largest factor ≤ radix, repeatedly; a leftover as one stage."""
    if n < 2:
        raise HarpqError(f"a butterfly schedule needs a size of at least 2, not {n}")
    schedule, rest = [], n
    while rest % radix == 0:
        schedule.append(radix)
        rest //= radix
    while rest > 1:
        factor = next((b for b in range(min(radix, rest), 1, -1) if rest % b == 0), rest)
        schedule.append(factor)
        rest //= factor
    return schedule


def check_schedule(n: int, schedule: list[int]) -> None:
    if any(b < 2 for b in schedule) or math.prod(schedule) != n:
        raise HarpqError(f"butterfly schedule {schedule} does not factor {n} (radices ≥ 2 multiplying to n)")


_MIXERS: dict[int, torch.Tensor] = {}


def fixed_mixer(b: int) -> torch.Tensor:
    """The fixed b×b orthogonal mixer, float64: normalised Sylvester Hadamard, or a seeded Haar block."""
    if b not in _MIXERS:
        if b & (b - 1) == 0:
            m = torch.from_numpy(sylvester(b)).to(torch.float64) / math.sqrt(b)
        else:  # deterministic from b alone, so a checkpoint needs no stored mixer
            gen = torch.Generator().manual_seed(10007 * b)
            q, r = torch.linalg.qr(torch.randn(b, b, generator=gen, dtype=torch.float64))
            m = q * torch.sign(torch.diagonal(r))
        _MIXERS[b] = m
    return _MIXERS[b]


def skew_from_upper(upper: torch.Tensor, b: int) -> torch.Tensor:
    """(D, b(b−1)/2) strictly-upper entries -> (D, b, b) skew-symmetric S."""
    rows, cols = torch.triu_indices(b, b, offset=1, device=upper.device)
    s = upper.new_zeros(upper.shape[0], b, b)
    s[:, rows, cols] = upper
    return s - s.transpose(1, 2)


def cayley(s: torch.Tensor) -> torch.Tensor:
    """(I + S)⁻¹(I − S) for a batch of skew-symmetric S: orthogonal, and I at S = 0 (I + S is never singular)."""
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device).expand_as(s)
    return torch.linalg.solve(eye + s, eye - s)


def stage_kernels(upper: torch.Tensor, b: int) -> torch.Tensor:
    """Learnable parameters of one stage -> its (D, b, b) blocks Cayley(S)·M."""
    return cayley(skew_from_upper(upper, b)) @ fixed_mixer(b).to(device=upper.device, dtype=upper.dtype)


def apply_stages(
    x: torch.Tensor, kernels: list[torch.Tensor], schedule: list[int], transpose: bool = False
) -> torch.Tensor:
    """B_T ⋯ B_1 x (or B_1ᵀ ⋯ B_Tᵀ x) along the last dim, one batched product per stage.

    kernels[t] is (n/b_t, b_t, b_t), one block per position of the other digits, or (b_t, b_t) shared.
    """
    n = x.shape[-1]
    lead = x.shape[:-1]
    strides = [math.prod(schedule[:t]) for t in range(len(schedule))]
    order = range(len(schedule) - 1, -1, -1) if transpose else range(len(schedule))
    for t in order:
        b, lo = schedule[t], strides[t]
        hi = n // (b * lo)
        y = x.reshape(-1, hi, b, lo)
        if kernels[t].dim() == 2:  # one block shared by every position (a fixed stage)
            x = torch.einsum("cd,rhcl->rhdl" if transpose else "dc,rhcl->rhdl", kernels[t], y)
            continue
        k = kernels[t].view(hi, lo, b, b)
        # block (h, l) maps digit c to digit d: y'[r, h, d, l] = Σ_c K[h, l, d, c] · y[r, h, c, l]
        x = torch.einsum("hlcd,rhcl->rhdl" if transpose else "hldc,rhcl->rhdl", k, y)
    return x.reshape(*lead, n)
