"""The bitshift trellis (QTIP): Viterbi against brute force, the bitstream round trip, tail-biting's exact
k·T bits, and the Gaussian distortion of the computed codes against QTIP's Table 1."""

import itertools

import pytest
import torch

from harpq.codebooks.trellis import quantize_tail_biting, viterbi
from harpq.errors import HarpqError
from harpq.formats.trellis import code_values, pack, unpack


def walks_of(L: int, k: int, t: int) -> torch.Tensor:
    """Every walk of t states (all bitstreams of L + (t − 1)·k bits)."""
    nbits = L + (t - 1) * k
    bits = torch.tensor(list(itertools.product([0, 1], repeat=nbits)), dtype=torch.int64)
    weights = 1 << torch.arange(L - 1, -1, -1)
    return torch.stack([(bits[:, i * k:i * k + L] * weights).sum(1) for i in range(t)], dim=1)


def sse(x, values, walk):
    return ((x - values[walk]) ** 2).sum(-1)


@pytest.mark.parametrize("L,k,t", [(4, 1, 6), (5, 2, 4), (6, 3, 3)])
def test_viterbi_equals_brute_force(L, k, t):
    gen = torch.Generator().manual_seed(L + k)
    values = torch.randn(1 << L, generator=gen)
    x = torch.randn(5, t, generator=gen)
    every = walks_of(L, k, t)  # (W, t)
    costs = ((x[:, None, :] - values[every][None]) ** 2).sum(-1)  # (5, W)
    walk = viterbi(x, values, L, k)
    assert torch.allclose(sse(x, values, walk), costs.min(1).values, rtol=1e-5)
    high = torch.randint(0, 1 << (L - k), (5,), generator=gen)  # pinned ends, as tail-biting pins them
    pinned = viterbi(x, values, L, k, start_high=high, end_low=high)
    assert torch.equal(pinned[:, 0] >> k, high) and torch.equal(pinned[:, -1] & ((1 << (L - k)) - 1), high)
    low = (1 << (L - k)) - 1
    allowed = ((every[None, :, 0] >> k) == high[:, None]) & ((every[None, :, -1] & low) == high[:, None])
    want = torch.where(allowed, costs, torch.inf).min(1).values
    assert torch.allclose(sse(x, values, pinned), want, rtol=1e-5)


def test_a_walk_is_its_bitstream():
    L, k, t = 10, 2, 32
    values = code_values("1mad", L)
    x = torch.randn(4, t, generator=torch.Generator().manual_seed(0))
    free = viterbi(x, values, L, k)
    bits = pack(free, L, k, tail_biting=False)
    assert bits.shape == (4, L + (t - 1) * k)
    assert torch.equal(unpack(bits, L, k, t, tail_biting=False), free)
    consecutive = (free[:, 1:] >> k) == (free[:, :-1] & ((1 << (L - k)) - 1))  # each step shifts in k bits
    assert consecutive.all()
    tb = quantize_tail_biting(x, values, L, k)
    bits = pack(tb, L, k)
    assert bits.shape == (4, k * t)  # exactly k bits per weight
    assert torch.equal(unpack(bits, L, k, t), tb)
    assert torch.equal(values[unpack(bits, L, k, t)], values[tb])  # decode(encode(x)) is the walk's values


def test_tail_biting_approximation_is_near_the_optimal_tail_biting_walk():
    """QTIP Table 2: the two-pass approximation against the best walk over every shared seam (brute force)."""
    L, k, t = 10, 2, 128
    values = code_values("3inst", L)
    values = values / values.pow(2).mean().sqrt()
    x = torch.randn(16, t, generator=torch.Generator().manual_seed(1))
    approx = sse(x, values, quantize_tail_biting(x, values, L, k)).sum()
    best = torch.full((16,), torch.inf)
    for seam in range(1 << (L - k)):
        pinned = torch.full((16,), seam)
        best = torch.minimum(best, sse(x, values, viterbi(x, values, L, k, start_high=pinned, end_low=pinned)))
    free = sse(x, values, viterbi(x, values, L, k)).sum()
    assert free <= best.sum() <= approx <= 1.01 * best.sum()


@pytest.mark.parametrize("code", ["1mad", "3inst"])
def test_gaussian_distortion_matches_qtip_table_1(code):
    """i.i.d. N(0, 1) at k = 2, L = 16, T = 256, tail-biting: MSE 0.069 in QTIP's Table 1 (the bound 0.0625)."""
    values = code_values(code)
    values = values / values.pow(2).mean().sqrt()
    x = torch.randn(24, 256, generator=torch.Generator().manual_seed(2))
    mse = float(sse(x, values, quantize_tail_biting(x, values, 16, 2)).sum() / x.numel())
    assert abs(mse - 0.069) <= 0.004, mse
    assert mse > 2 ** -4  # never below the distortion-rate bound


def test_hyb_distortion_matches_qtip_table_1():
    """HYB (V = 2: two weights per state from a 512-row table) at k = 2, L = 16: MSE 0.071 in Table 1."""
    from harpq.formats.trellis import hyb_table, hyb_values

    values = hyb_values(hyb_table())  # (2^16, 2), unit RMS
    x = torch.randn(24, 128, 2, generator=torch.Generator().manual_seed(2))  # 24 sequences of 256 weights
    walk = quantize_tail_biting(x, values, 16, 4)  # 2 bits per weight, 2 weights per step: 4 bits shift in
    mse = float(((x - values[walk]) ** 2).mean())
    assert abs(mse - 0.071) <= 0.004, mse
    assert pack(walk, 16, 4).shape == (24, 2 * 256)  # still exactly k·T bits


def test_code_values_are_near_gaussian():
    for code in ("1mad", "3inst"):
        v = code_values(code).double()
        v = (v - v.mean()) / v.std()
        assert abs(float((v ** 4).mean()) - 3) < 0.6  # Gaussian-like tails (kurtosis 3)


def test_bad_input_is_refused_in_one_line():
    with pytest.raises(HarpqError, match="unknown computed trellis code"):
        code_values("hyb")
    with pytest.raises(HarpqError, match="1 ≤ k < L"):
        viterbi(torch.zeros(1, 4), torch.zeros(16), 4, 4)
    with pytest.raises(HarpqError, match="has 8 bits, not 7"):
        unpack(torch.zeros(1, 7, dtype=torch.bool), 4, 2, 4)
    free = torch.tensor([[0b1111, 0b1100, 0b0000]])  # ends at 00, starts with 11: not a cycle
    with pytest.raises(HarpqError, match="does not bite its tail"):
        pack(free, 4, 2)
    with pytest.raises(HarpqError, match="at least 2 steps"):
        quantize_tail_biting(torch.zeros(1, 1), torch.zeros(16), 4, 2)


def test_qtip_codebook_stores_what_it_rounded_in_k_bits_per_weight():
    from harpq.codebooks import make_codebook

    cb = make_codebook({"name": "qtip", "bits": 2, "L": 10})
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(3)) * 0.02
    state = cb.prepare(w)
    blocks = [cb.round(w[:, j:j + 16], torch.arange(j, j + 16), state) for j in range(0, 64, 16)]
    codes, recon = torch.cat([b[0] for b in blocks], 1), torch.cat([b[1] for b in blocks], 1)
    buffers = cb.encode(codes, state)
    assert torch.equal(cb.decode(buffers, 48, 64), recon)  # decode(encode) is exactly what was rounded
    specs = cb.buffer_specs(48, 64)
    assert {k: (tuple(v.shape), v.dtype) for k, v in buffers.items()} == specs
    assert specs["codes"][0] == (12, 16)  # 12 tiles × 256 weights × 2 bits = 16 words each
    rel = float((recon - w).pow(2).mean() / w.pow(2).mean())
    assert 0.04 < rel < 0.12  # near the trellis' Gaussian MSE at k = 2 (0.07–0.09 at L = 10)


def test_hyb_codebook_stores_its_table_and_decodes_what_it_rounded():
    from harpq.codebooks import make_codebook

    cb = make_codebook({"name": "qtip", "bits": 2, "L": 10, "code": "hyb"})
    w = torch.randn(32, 32, generator=torch.Generator().manual_seed(4))
    state = cb.prepare(w)
    blocks = [cb.round(w[:, j:j + 16], torch.arange(j, j + 16), state) for j in (0, 16)]
    buffers = cb.encode(torch.cat([b[0] for b in blocks], 1), state)
    assert buffers["table"].shape == (512, 2) and buffers["codes"].shape == (4, 16)
    assert torch.equal(cb.decode(buffers, 32, 32), torch.cat([b[1] for b in blocks], 1))


def test_qtip_quantizes_llama_tiny_end_to_end(tiny_path, tmp_path):
    import harpq
    from tests.conftest import CALIB

    recipe = harpq.Recipe.preset("qtip", trellis_L=10)
    recipe.overrides.append((r"mlp\.", {"codebook": "e8p"}))  # llama-tiny's MLP width 344 is not a multiple of 16
    out = harpq.quantize(tiny_path, tmp_path / "q", recipe, calib=CALIB, nsamples=4, seqlen=64, progress=False)
    model = harpq.load(out).eval()
    attn = model.model.layers[0].self_attn.q_proj
    m, n = attn.out_features, attn.in_features
    assert attn.format.name == "qtip" and attn.stored_bits() == 2 * m * n + 16 + 16 * (m + n)  # codes, scale, signs
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_qtip_refuses_shapes_it_cannot_tile():
    from harpq.codebooks import make_codebook

    with pytest.raises(HarpqError, match="multiples of 16"):
        make_codebook({"name": "qtip", "bits": 2}).check_shape(344, 128, "mlp.up_proj")
    with pytest.raises(HarpqError, match="offers 2, 3, 4 bits"):
        make_codebook({"name": "qtip", "bits": 5})


def test_harp_fits_qtip_against_e8p_and_rounds_with_the_trellis():
    from harpq.codebooks import E8PCodebook, make_codebook
    from harpq.pipeline.linear import quantize_linear
    from harpq.recipe import Recipe

    assert isinstance(make_codebook({"name": "qtip", "bits": 3}).fit_target(), E8PCodebook)
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(32, 64, generator=gen, dtype=torch.float64) * 0.02
    x = torch.randn(256, 64, generator=gen, dtype=torch.float64)
    layer = Recipe.preset("harp", codebook="qtip", trellis_L=8, harp_steps=3, harp_schedule="kron").layer
    lin = torch.nn.Linear(64, 32, bias=False).double()
    lin.weight.data.copy_(w)
    module, report = quantize_linear("q", lin, x.T @ x, layer)
    assert module.format.name == "qtip" and report.parts["fit"]["steps"] == 3
    assert report.proxy_loss <= report.parts["fit"]["proxy_loss_start"]  # never above its start


def test_tile_order_is_the_tensor_core_fragment_order():
    """Walk position 8l + j is lane l = 4g + t's weight j of mma.m16n8k16's A fragment: row g (j < 4) or
    g + 8, column 4t + j mod 4; to_tiles / from_tiles are inverse."""
    from harpq.formats.trellis import TILE_ORDER, from_tiles, to_tiles

    assert sorted(TILE_ORDER.tolist()) == list(range(256))
    w = torch.arange(32 * 48).reshape(32, 48)
    tiles = to_tiles(w)
    for lane, j in [(0, 0), (5, 3), (5, 4), (31, 7)]:
        g, t = divmod(lane, 4)
        assert tiles[0, 8 * lane + j] == w[g + 8 * (j // 4), 4 * t + j % 4]
    assert tiles[1, 0] == w[0, 16]  # tiles row-block-major
    assert torch.equal(from_tiles(tiles, 32, 48), w)


def test_stacked_trellis_matrices_decode_with_their_own_scales():
    from harpq.formats import TrellisTiles

    fmt = TrellisTiles(2)
    parts = [(fmt.random_buffers(m, 64, torch.Generator().manual_seed(m)), m) for m in (32, 16)]
    stacked = fmt.concat_rows(parts, 64)
    assert stacked["scales"].shape == (48, 1)
    assert torch.equal(fmt.decode(stacked, 48, 64), torch.cat([fmt.decode(b, m, 64) for b, m in parts]))
    assert TrellisTiles(2, 16, "hyb").concat_rows(parts, 64) is None  # one table per matrix
