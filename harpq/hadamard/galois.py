"""Finite fields GF(p^k) small enough for Paley constructions: subtraction and the quadratic character.

Elements are integers 0..q−1 read as base-p digit vectors (polynomial coefficients, lowest first);
multiplication is modulo the first monic irreducible polynomial of degree k found by search.
"""

from __future__ import annotations

from functools import cache

import numpy as np


def prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k, p prime, or None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    k, r = 0, q
    while r % p == 0:
        r //= p
        k += 1
    return (p, k) if r == 1 else None


def _digits(a: int, p: int, k: int) -> list[int]:
    return [(a // p**i) % p for i in range(k)]


def _polymul_mod(a: list[int], b: list[int], modulus: list[int], p: int) -> list[int]:
    k = len(modulus) - 1
    prod = [0] * (2 * k - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            prod[i + j] = (prod[i + j] + x * y) % p
    for d in range(len(prod) - 1, k - 1, -1):  # reduce by the monic modulus
        c = prod[d]
        if c:
            for i in range(k + 1):
                prod[d - k + i] = (prod[d - k + i] - c * modulus[i]) % p
    return prod[:k]


@cache
def _field(q: int) -> tuple[np.ndarray, np.ndarray]:
    """(sub table q×q, quadratic character of each element) of GF(q)."""
    pk = prime_power(q)
    if pk is None:
        raise ValueError(f"{q} is not a prime power")
    p, k = pk
    digits = [_digits(a, p, k) for a in range(q)]
    weights = [p**i for i in range(k)]

    def to_int(d: list[int]) -> int:
        return sum(x * w for x, w in zip(d, weights, strict=True))

    modulus = None
    if k == 1:
        squares = {(a * a) % p for a in range(1, p)}
    else:
        for tail in range(p**k):  # monic x^k + tail; irreducible iff every nonzero element is invertible
            cand = _digits(tail, p, k) + [1]
            ones = {to_int(_polymul_mod(digits[a], digits[b], cand, p)) for a in range(1, q) for b in range(1, q)}
            if 0 not in ones:
                modulus = cand
                break
        squares = {to_int(_polymul_mod(digits[a], digits[a], modulus, p)) for a in range(1, q)}
    sub = np.array([[to_int([(x - y) % p for x, y in zip(digits[a], digits[b], strict=True)])
                     for b in range(q)] for a in range(q)])
    chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)])
    return sub, chi


def jacobsthal(q: int) -> np.ndarray:
    """Q_ab = χ(a − b) over GF(q): the core of both Paley constructions."""
    sub, chi = _field(q)
    return chi[sub]
