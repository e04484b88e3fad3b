import math

import numpy as np
import pytest
import torch

from harpq import HarpqError
from harpq.hadamard import fwht, hadamard_matrix, hadamard_matrix_tensor, hadamard_transform, split_order
from harpq.hadamard.construct import paley1, paley2, sylvester
from harpq.hadamard.galois import jacobsthal, prime_power

REQUIRED = [1, 2, 4, 12, 20, 28, 36, 40, 44, 52, 60, 76, 108, 140, 148, 156, 172]


@pytest.mark.parametrize("k", REQUIRED + [24, 68, 100, 124, 164, 344])
def test_every_order_is_hadamard(k):
    h = hadamard_matrix(k)
    assert h is not None and h.shape == (k, k)
    assert set(np.unique(h)) <= {-1, 1}
    assert np.array_equal(h @ h.T, k * np.eye(k, dtype=np.int64))


@pytest.mark.parametrize("q,order", [(27, 28), (343, 344), (11, 12)])
def test_paley_one_over_prime_power_fields(q, order):
    h = paley1(q)
    assert np.array_equal(h @ h.T, order * np.eye(order, dtype=np.int64))


@pytest.mark.parametrize("q", [5, 9, 13, 25, 73])
def test_paley_two_over_prime_power_fields(q):
    h = paley2(q)
    n = 2 * (q + 1)
    assert np.array_equal(h @ h.T, n * np.eye(n, dtype=np.int64))


def test_quadratic_character_over_gf9():
    # GF(9) has 4 nonzero squares; χ(a − b) = χ(−1)χ(b − a) = χ(b − a) because 9 ≡ 1 (mod 4)
    q = jacobsthal(9)
    assert (q == 1).sum(axis=1).tolist() == [4] * 9
    assert np.array_equal(q, q.T)
    assert prime_power(343) == (7, 3) and prime_power(12) is None


@pytest.mark.parametrize(
    "n,split",
    [(4096, (1, 4096)), (11008, (172, 64)), (14336, (28, 512)), (28672, (28, 1024)), (18944, (148, 128)),
     (9728, (76, 128)), (12288, (12, 1024)), (344, (172, 2)), (1376, (172, 8))],
)
def test_real_model_widths_split(n, split):
    assert split_order(n) == split


def test_fwht_is_sylvester():
    x = torch.randn(3, 64, dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ torch.from_numpy(sylvester(64)).double().T, atol=1e-12)


@pytest.mark.parametrize("n", [8, 48, 128, 344, 1376, 156 * 4])
def test_transform_is_the_orthonormal_kronecker_matrix(n):
    k, p = split_order(n)
    dense = torch.from_numpy(np.kron(hadamard_matrix(k), sylvester(p))).double() / math.sqrt(n)
    x = torch.randn(5, n, dtype=torch.float64)
    assert torch.allclose(hadamard_transform(x), x @ dense.T, atol=1e-12)
    assert torch.allclose(hadamard_transform(x, transpose=True), x @ dense, atol=1e-12)
    h = hadamard_matrix_tensor(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_pinned_factor_order_is_honoured():
    x = torch.randn(2, 1376, dtype=torch.float64)
    a, b = hadamard_transform(x, k=172), hadamard_transform(x, k=344)
    assert not torch.allclose(a, b)  # different (equally valid) matrices
    assert torch.allclose(a.norm(dim=-1), x.norm(dim=-1)) and torch.allclose(b.norm(dim=-1), x.norm(dim=-1))


@pytest.mark.parametrize("n", [30, 43, 58])
def test_sizes_without_a_hadamard_are_rejected(n):
    assert split_order(n) is None
    with pytest.raises(HarpqError, match=f"order {n}"):
        hadamard_transform(torch.zeros(1, n))


def test_transform_cost_is_subquadratic():
    # O(n log n + nK): the dense factor for 11008 is 172 wide, far below n
    k, p = split_order(11008)
    assert k * 11008 + 11008 * math.log2(p) < 11008**2 / 50
