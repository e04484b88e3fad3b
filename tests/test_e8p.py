import json

import pytest
import torch
from conftest import CALIB
from helpers import ldl_block_reference, random_hessian

import harpq
from harpq import HarpqError
from harpq.codebooks import E8PCodebook
from harpq.codebooks.e8p import e8p_nearest
from harpq.formats.lattice import e8_one_bit_points, e8p_abs_table, e8p_all_codewords, e8p_decode
from harpq.rounding import block_ldlq, nearest, proxy_loss


def in_e8(y: torch.Tensor) -> torch.Tensor:
    whole = (y == y.round()).all(-1)
    half = ((y - 0.5) == (y - 0.5).round()).all(-1)
    return (whole | half) & (y.sum(-1).round() % 2 == 0)


@pytest.fixture(scope="module")
def codewords():
    return e8p_all_codewords()


def test_source_table():
    s = e8p_abs_table()
    norms = (s * s).sum(1)
    assert s.shape == (256, 8) and len({tuple(r) for r in s.tolist()}) == 256
    assert int((norms <= 10).sum()) == 227 and int((norms == 12).sum()) == 29
    assert bool(((s * 2) % 2 == 1).all())  # half-integers


def test_65536_distinct_codewords_in_shifted_e8(codewords):
    assert codewords.shape == (65536, 8)
    assert torch.unique(codewords, dim=0).shape[0] == 65536
    assert bool(in_e8(codewords - 0.25).all())


def test_one_bit_e8_codebook():
    pts = e8_one_bit_points()
    assert torch.unique(pts, dim=0).shape[0] == 256 and bool(in_e8(pts).all())
    assert int(((pts * pts).sum(1) == 2).sum()) == 240


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0])
def test_nearest_agrees_with_brute_force(codewords, scale):
    x = torch.randn(1500, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * scale
    codes, q = e8p_nearest(x)
    d = (x * x).sum(1, keepdim=True) - 2 * x @ codewords.T + (codewords * codewords).sum(1)
    assert torch.allclose(((x - q) ** 2).sum(1), d.min(1).values, atol=1e-9)
    assert torch.equal(e8p_decode(codes, torch.float64), q)


def test_decode_inverts_codes(codewords):
    _, q = e8p_nearest(codewords)
    assert torch.equal(q, codewords)


def gaussian_mse(codebook: E8PCodebook, rho: float, count: int = 24000) -> float:
    z = torch.randn(count, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _, q = codebook._quantize(z * rho)
    return float(((q / rho - z) ** 2).mean())


def test_e8p_mse_at_the_optimal_scale():
    mse = min(gaussian_mse(E8PCodebook(2), rho) for rho in (0.95, 1.0, 1.03, 1.06, 1.1))
    assert abs(mse - 0.092) < 0.003
    assert 0.0625 < mse < 0.118  # above the rate–distortion bound, below scalar Lloyd–Max


def test_rvq_mse_ordering_and_bounds():
    three = gaussian_mse(E8PCodebook(3), 0.98)
    four = gaussian_mse(E8PCodebook(4), 1.03)
    assert 2 ** -6 < three < 0.0345 and 2 ** -8 < four < 0.0125
    assert four < three < gaussian_mse(E8PCodebook(2), 1.03)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_encode_decode_and_bits(bits):
    w = torch.randn(24, 64)
    cb = E8PCodebook(bits)
    state = cb.prepare(w)
    codes, recon = nearest(w, cb, state)
    buffers = cb.encode(codes, state)
    assert torch.equal(cb.decode(buffers, 24, 64), recon)
    stored = sum(t.numel() * t.element_size() * 8 for name, t in buffers.items() if name.startswith("codes"))
    assert stored == bits * 24 * 64


def test_block_ldlq_with_e8p_is_the_paper_sweep():
    w = torch.randn(16, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    h = random_hessian(64)
    cb = E8PCodebook(2)
    state = cb.prepare(w)
    # the paper sweeps blocks last to first; ours sweeps first to last, so feed reversed blocks of 8
    block_rev = (torch.arange(7, -1, -1)[:, None] * 8 + torch.arange(8)).reshape(-1)
    _, recon, _ = block_ldlq(w[:, block_rev], h[block_rev][:, block_rev], cb, state)
    ref = ldl_block_reference(w, h, cb, state, 8)
    assert torch.allclose(recon[:, torch.argsort(block_rev)], ref, atol=1e-9)


def test_ldlq_and_tuning_lower_the_proxy_loss():
    w = torch.randn(32, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    h = random_hessian(128)
    cb = E8PCodebook(2)
    state = cb.prepare(w)
    losses = [proxy_loss(w, nearest(w, cb, state)[1], h)]
    for passes in (0, 2):
        losses.append(proxy_loss(w, block_ldlq(w, h, cb, state, tune_passes=passes)[1], h))
    assert losses[0] > losses[1] >= losses[2]


def test_shape_and_bits_errors():
    with pytest.raises(HarpqError, match="2, 3 and 4 bits"):
        E8PCodebook(5)
    with pytest.raises(HarpqError, match="not a multiple of 8"):
        E8PCodebook(2).check_shape(8, 60, "x")


def test_quipsharp_end_to_end(tiny_path, tmp_path):
    out = tmp_path / "qs"
    harpq.quantize(tiny_path, out, harpq.Recipe.preset("quipsharp", bits=2, scale_sweep=True), calib=CALIB,
                   nsamples=4, seqlen=64, progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    rho = qc["recipe"]["layer"]["e8p_scale"]
    assert rho is not None and qc["modules"]["model.layers.1.mlp.up_proj"]["codebook"]["scale"] == rho
    model = harpq.load(out)
    down = model.model.layers[0].mlp.down_proj
    assert down.codes.dtype == torch.int16 and down.processor.name == "rht"
    m, n = down.out_features, down.in_features
    assert down.stored_bits() == 2 * m * n + 16 * (m + n) + 16  # codes, two sign vectors, one scale
    log = [json.loads(line) for line in (out / "quant_log.jsonl").read_text().splitlines()]
    assert all(0 < e["proxy_loss"] < 0.2 for e in log)
    assert log[0]["codebook"]["name"] == "e8p"
