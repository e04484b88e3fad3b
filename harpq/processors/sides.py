"""One side of a two-sided processor: an orthogonal n×n matrix Q with fast Q·x and Qᵀ·x.

A side owns a few named tensors in the processor's buffer dict (under a prefix, `u_` for the output
side and `v_` for the input side) and a small JSON spec, so a checkpoint records exactly which
transform it was made with even if a later harpq would choose another for the same size.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from typing import Any

import torch

from ..errors import HarpqError
from ..formats import BufferSpec
from ..hadamard import hadamard_transform, split_order
from ..hadamard.construct import sylvester
from ..hadamard.transform import FWHT_RADIX, dense_factor

log = logging.getLogger(__name__)
Buffers = dict[str, torch.Tensor]


class Side(ABC):
    kind: str

    def __init__(self, n: int):
        self.n = n

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind}

    @abstractmethod
    def buffer_specs(self, prefix: str) -> BufferSpec: ...

    @abstractmethod
    def init(self, prefix: str, gen: torch.Generator) -> Buffers: ...

    @abstractmethod
    def forward(self, b: Buffers, prefix: str, x: torch.Tensor) -> torch.Tensor:
        """Q x along the last dim."""

    @abstractmethod
    def backward(self, b: Buffers, prefix: str, x: torch.Tensor) -> torch.Tensor:
        """Qᵀ x along the last dim."""

    def kernel_form(self, transpose: bool) -> tuple[int, torch.Tensor | None] | None:
        """Q (Qᵀ with `transpose`) without its signs as A ⊗ H_b (H_b Sylvester, A a ±1 matrix over the runs of
        b entries, None for the identity), for kernels that apply a side to a tile of runs; None where the
        side is not of that form."""
        return None

    def run_stages(self, b: Buffers, prefix: str, transpose: bool = False) -> tuple[list[int], torch.Tensor] | None:
        """For a side whose `kernel_form` is runs of b entries with learned stages in place of H_b: the radices
        of those stages and their blocks (float32, stage after stage, each (n / radix, radix, radix); each
        block transposed with `transpose`, the stages then applied in reverse order); None where the runs hold
        H_b."""
        return None

    def stages(self, b: Buffers, prefix: str) -> tuple[torch.Tensor, list[torch.Tensor], list[int]] | None:
        """(signs, blocks, schedule) with Q x = apply_stages(signs ⊙ x, blocks, schedule), for the run-time
        stage kernels; None where Q is not such a product."""
        return None


def random_signs(n: int, gen: torch.Generator) -> torch.Tensor:
    return (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(torch.float16)


class SignedSide(Side):
    """A side whose only stored parameters are n random signs (the fixed transforms of the RHT family)."""

    def buffer_specs(self, prefix: str) -> BufferSpec:
        return {prefix + "signs": ((self.n,), torch.float16)}

    def init(self, prefix: str, gen: torch.Generator) -> Buffers:
        return {prefix + "signs": random_signs(self.n, gen)}


class HadamardSide(SignedSide):
    """Q = H_n · diag(s): random signs, then the orthonormal Hadamard of order n = K·2^k (QuIP#'s RHT)."""

    kind = "hadamard"

    def __init__(self, n: int, k: int):
        super().__init__(n)
        p = n // k if k > 0 else 0
        if k < 1 or p * k != n or p & (p - 1):
            raise HarpqError(f"a Hadamard side of {n} inputs cannot have a dense factor of order {k} "
                             "(n must be k times a power of two)")
        self.k = k

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "k": self.k}

    def forward(self, b: Buffers, prefix: str, x: torch.Tensor) -> torch.Tensor:
        return hadamard_transform(x * b[prefix + "signs"].to(x.dtype), k=self.k)

    def backward(self, b: Buffers, prefix: str, x: torch.Tensor) -> torch.Tensor:
        return hadamard_transform(x, transpose=True, k=self.k) * b[prefix + "signs"].to(x.dtype)

    def kernel_form(self, transpose: bool, max_block: int = 128) -> tuple[int, torch.Tensor | None]:
        """H_n = (H_K ⊗ H_{p/b}) ⊗ H_b for n = K·p (p a power of two, b = min(p, max_block)): runs of b
        consecutive entries, mixed by A = H_K ⊗ H_{p/b} (Hᵀ_K with `transpose`; Sylvester is symmetric)."""
        p = self.n // self.k
        block = min(p, max_block)
        h = dense_factor(self.k, torch.float64, torch.device("cpu"))
        outer = torch.kron(h.T.contiguous() if transpose else h, torch.from_numpy(sylvester(p // block)).double())
        return block, (None if outer.shape[0] == 1 else outer)

    def stages(self, b: Buffers, prefix: str) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
        """Sylvester stages of radix ≤ 64 over the 2^j digits (fastest first), then the dense H_K."""
        signs = b[prefix + "signs"]
        p, radices = self.n // self.k, []
        while math.prod(radices) < p:
            radices.append(min(FWHT_RADIX, p // math.prod(radices)))
        if self.k > 1:
            radices.append(self.k)
        # the transform library's own factors (Sylvester for powers of two), orthonormalised
        return signs, [dense_factor(r, torch.float64, signs.device) / math.sqrt(r) for r in radices], radices


class BlockHadamardSide(SignedSide):
    """Q = (I ⊗ H_b) · diag(s): random signs, then the orthonormal Sylvester Hadamard on each run of b
    consecutive entries (b a power of two dividing n). Cheaper to apply and to fuse than the full RHT (a
    block fits in one thread block, as exllamav3's and llm-compressor's transforms use), at the price of
    spreading outliers only within a block."""

    kind = "hadamard-block"

    def __init__(self, n: int, block: int):
        super().__init__(n)
        if block < 2 or block & (block - 1) or n % block:
            raise HarpqError(f"a block Hadamard side needs a power-of-two block dividing {n}, not {block}")
        self.block = block

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "block": self.block}

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return hadamard_transform(x.reshape(*shape[:-1], self.n // self.block, self.block), k=1).reshape(shape)

    def forward(self, b: Buffers, prefix: str, x: torch.Tensor) -> torch.Tensor:
        return self._blocks(x * b[prefix + "signs"].to(x.dtype))

    def backward(self, b: Buffers, prefix: str, x: torch.Tensor) -> torch.Tensor:
        return self._blocks(x) * b[prefix + "signs"].to(x.dtype)  # H_b is symmetric

    def kernel_form(self, transpose: bool) -> tuple[int, None]:
        return self.block, None

    def stages(self, b: Buffers, prefix: str) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
        """Sylvester stages of radix ≤ 64 over the digits inside a block; the blocks' index is untouched."""
        radices = []
        while math.prod(radices) < self.block:
            radices.append(min(FWHT_RADIX, self.block // math.prod(radices)))
        signs = b[prefix + "signs"]
        return signs, [dense_factor(r, torch.float64, signs.device) / math.sqrt(r) for r in radices], radices


def block_size(n: int, block: int) -> int:
    """The run length of a block-diagonal side of size n: `block`, or the largest power of two below it that
    divides n."""
    b = block
    while b > 1 and n % b:
        b //= 2
    if b < 2:
        raise HarpqError(f"size {n} is odd: no block Hadamard transform exists")
    if b != block:
        log.info("blocks of %d entries for size %d (%d does not divide it)", b, n, block)
    return b


def block_hadamard(n: int, block: int) -> BlockHadamardSide:
    """The block side for size n: blocks of `block` entries, or of the largest power of two dividing n
    where `block` does not divide it."""
    return BlockHadamardSide(n, block_size(n, block))


class FourierSide(Side):
    """QuIP#'s randomized FFT: read x as n/2 complex numbers, multiply by random phases, unitary FFT."""

    kind = "fft"

    def buffer_specs(self, prefix: str) -> BufferSpec:
        return {prefix + "phase": ((self.n // 2,), torch.float32)}

    def init(self, prefix: str, gen: torch.Generator) -> Buffers:
        theta = torch.rand(self.n // 2, generator=gen, dtype=torch.float64) * 2 * torch.pi
        return {prefix + "phase": theta.float()}

    @staticmethod
    def _complex(x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1] // 2
        real = torch.float64 if x.dtype == torch.float64 else torch.float32
        return torch.complex(x[..., :h].to(real), x[..., h:].to(real))

    def _rotor(self, b: Buffers, prefix: str, z: torch.Tensor) -> torch.Tensor:
        theta = b[prefix + "phase"].to(z.real.dtype)
        return torch.polar(torch.ones_like(theta), theta)

    def forward(self, b: Buffers, prefix: str, x: torch.Tensor) -> torch.Tensor:
        z = self._complex(x)
        z = torch.fft.fft(z * self._rotor(b, prefix, z), norm="ortho")
        return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)

    def backward(self, b: Buffers, prefix: str, x: torch.Tensor) -> torch.Tensor:
        z = self._complex(x)
        z = torch.fft.ifft(z, norm="ortho") * self._rotor(b, prefix, z).conj()
        return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def near_square_factors(n: int) -> tuple[int, int]:
    a = max(d for d in range(1, int(n**0.5) + 1) if n % d == 0)
    return a, n // a


def haar_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def nearest_orthogonal(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor of a stored (rounded) factor, in float64, so that Q and Qᵀ invert exactly."""
    u, _, vh = torch.linalg.svd(a.to(torch.float64))
    return u @ vh


class KroneckerSide(Side):
    """QuIP's Q = (A ⊗ B) · P: two Haar-random orthogonal factors of near-square sizes and a permutation."""

    kind = "kron"

    def __init__(self, n: int):
        super().__init__(n)
        self.a, self.b = near_square_factors(n)

    def _perm_dtype(self) -> torch.dtype:
        return torch.int16 if self.n <= 2**15 else torch.int32

    def buffer_specs(self, prefix: str) -> BufferSpec:
        return {prefix + "left": ((self.a, self.a), torch.float16), prefix + "right": ((self.b, self.b), torch.float16),
                prefix + "perm": ((self.n,), self._perm_dtype())}

    def init(self, prefix: str, gen: torch.Generator) -> Buffers:
        left, right = haar_orthogonal(self.a, gen), haar_orthogonal(self.b, gen)
        return {prefix + "left": left.half(), prefix + "right": right.half(),
                prefix + "perm": torch.randperm(self.n, generator=gen).to(self._perm_dtype())}

    def _factors(self, b: Buffers, prefix: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return (nearest_orthogonal(b[prefix + "left"]).to(dtype), nearest_orthogonal(b[prefix + "right"]).to(dtype))

    def forward(self, b: Buffers, prefix: str, x: torch.Tensor) -> torch.Tensor:
        left, right = self._factors(b, prefix, x.dtype)
        y = x[..., b[prefix + "perm"].long()].reshape(*x.shape[:-1], self.a, self.b)
        return (left @ y @ right.T).reshape(x.shape)

    def backward(self, b: Buffers, prefix: str, x: torch.Tensor) -> torch.Tensor:
        left, right = self._factors(b, prefix, x.dtype)
        y = (left.T @ x.reshape(*x.shape[:-1], self.a, self.b) @ right).reshape(x.shape)
        out = torch.empty_like(y)
        out[..., b[prefix + "perm"].long()] = y
        return out


def hadamard_or_fft(n: int, name: str = "") -> Side:
    """The RHT side for size n: Hadamard if a K·2^k split is known, else the randomized FFT (n even)."""
    split = split_order(n)
    if split is not None:
        return HadamardSide(n, split[0])
    if n % 2 == 0:
        where = f" ({name})" if name else ""
        log.warning("no Hadamard matrix of order %d%s: using the randomized FFT transform", n, where)
        return FourierSide(n)
    raise HarpqError(f"size {n}{f' of {name}' if name else ''} is odd: no Hadamard or FFT incoherence transform exists")


def side_from_spec(n: int, spec: dict[str, Any]) -> Side:
    kind = spec["kind"]
    if kind == "hadamard":
        return HadamardSide(n, spec["k"])
    if kind == "fft":
        return FourierSide(n)
    if kind == "hadamard-block":
        return BlockHadamardSide(n, spec["block"])
    if kind == "kron":
        return KroneckerSide(n)
    raise HarpqError(f"unknown processor side {kind!r}")
