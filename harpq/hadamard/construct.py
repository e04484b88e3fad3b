"""Hadamard matrices of order K built from first principles (entries ±1, H Hᵀ = K·I).

Constructions, tried in this order: Sylvester (powers of two), Paley I (q + 1, q ≡ 3 mod 4 a prime
power), Paley II (2(q + 1), q ≡ 1 mod 4), Williamson (4n, from published symmetric circulant
sequences), and doubling H ↦ [[H, H], [H, −H]] of any smaller order. Together they cover every K that
real layer widths need (12, 20, 28, 36, 40, 44, 52, 60, 76, 108, 140, 148, 156, 172, ...).
"""

from __future__ import annotations

from functools import cache

import numpy as np

from .galois import jacobsthal, prime_power
from .williamson import WILLIAMSON


def sylvester(order: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.int64)
    while h.shape[0] < order:
        h = np.block([[h, h], [h, -h]])
    return h


def paley1(q: int) -> np.ndarray:
    """Order q + 1 for a prime power q ≡ 3 (mod 4): H = I + [[0, 1ᵀ], [−1, Q]]."""
    n = q + 1
    s = np.zeros((n, n), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jacobsthal(q)
    return s + np.eye(n, dtype=np.int64)


def paley2(q: int) -> np.ndarray:
    """Order 2(q + 1) for a prime power q ≡ 1 (mod 4), from the symmetric conference matrix."""
    n = q + 1
    c = np.zeros((n, n), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = jacobsthal(q)
    return np.kron(c, np.array([[1, 1], [1, -1]])) + np.kron(np.eye(n, dtype=np.int64), np.array([[1, -1], [-1, -1]]))


def williamson(a: list[int], b: list[int], c: list[int], d: list[int]) -> np.ndarray:
    """Order 4n from four symmetric circulant ±1 matrices with A² + B² + C² + D² = 4n·I."""
    A, B, C, D = (np.stack([np.roll(np.array(r, dtype=np.int64), i) for i in range(len(r))]) for r in (a, b, c, d))
    return np.block([[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]])


def _construct(order: int) -> np.ndarray | None:
    if order == 1 or (order & (order - 1)) == 0:
        return sylvester(order)
    if order % 4:
        return None
    pk = prime_power(order - 1)
    if pk is not None and (order - 1) % 4 == 3:
        return paley1(order - 1)
    pk = prime_power(order // 2 - 1)
    if pk is not None and (order // 2 - 1) % 4 == 1:
        return paley2(order // 2 - 1)
    if order // 4 in WILLIAMSON:
        return williamson(*WILLIAMSON[order // 4])
    half = _construct(order // 2) if order % 8 == 0 else None
    return None if half is None else np.block([[half, half], [half, -half]])


@cache
def hadamard_matrix(order: int) -> np.ndarray | None:
    """A ±1 Hadamard matrix of this order (read-only), or None if no construction here reaches it."""
    h = _construct(order)
    if h is not None:
        h.setflags(write=False)
    return h


def split_order(n: int) -> tuple[int, int] | None:
    """n = K · 2^k with the smallest K that has a Hadamard matrix here, or None."""
    if n < 1:
        return None
    odd = n
    while odd % 2 == 0:
        odd //= 2
    k = odd
    while k <= n:
        if n % k == 0 and hadamard_matrix(k) is not None:
            return k, n // k
        k *= 2
    return None
