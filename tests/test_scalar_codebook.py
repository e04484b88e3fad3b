import pytest
import torch

from harpq import HarpqError
from harpq.codebooks import ScalarGrid, make_codebook, stored_bits
from harpq.rounding import nearest


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [0, 32, 128])
def test_encode_decode_reproduces_rounding(bits, group_size):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(bits))
    cb = ScalarGrid(bits, group_size)
    state = cb.prepare(w)
    codes, recon = nearest(w, cb, state)
    assert int(codes.max()) <= 2**bits - 1
    decoded = cb.decode(cb.encode(codes, state), 48, 256)
    assert torch.equal(decoded, recon)
    # nearest rounding on a min-max grid is off by at most half a step
    step = state["scale"][:, state["group_index"]]
    assert bool(((recon - w).abs() <= step / 2 + 1e-6).all())


def test_ragged_last_group_is_its_own_range():
    w = torch.randn(4, 200)
    w[:, 192:] *= 100  # a last group of 8 with a much wider range must not widen group 1
    cb = ScalarGrid(4, 96, ragged_groups=True)
    state = cb.prepare(w)
    assert state["scale"].shape == (4, 3)
    assert bool((state["scale"][:, 2] > 10 * state["scale"][:, 1]).all())
    codes, recon = nearest(w, cb, state)
    assert torch.equal(cb.decode(cb.encode(codes, state), 4, 200), recon)


def test_stored_bits_match_gptq_accounting():
    # b bits per weight + a 16-bit scale and a b-bit zero per group
    cb = ScalarGrid(4, 128)
    assert stored_bits(cb.buffer_specs(4096, 4096)) == 4096 * 4096 * 4 + 4096 * 32 * (16 + 4)
    per_row = ScalarGrid(2, 0)
    assert stored_bits(per_row.buffer_specs(512, 1376)) / (512 * 1376) == pytest.approx(2 + 18 / 1376, abs=0.01)


def test_config_roundtrip():
    cb = ScalarGrid(3, 64, ragged_groups=True)
    again = make_codebook(cb.config())
    assert again.config() == cb.config()


@pytest.mark.parametrize("bits", [0, 5, 16])
def test_bits_not_offered(bits):
    with pytest.raises(HarpqError, match="offers 1, 2, 3, 4, 8 bits"):
        ScalarGrid(bits)


@pytest.mark.parametrize("g", [-1, 4])
def test_group_size_not_offered(g):
    with pytest.raises(HarpqError, match="group size must be"):
        ScalarGrid(4, g)


def test_group_size_must_divide_unless_ragged():
    with pytest.raises(HarpqError, match="does not divide in_features 1376 of layer.down"):
        ScalarGrid(4, 128).check_shape(512, 1376, "layer.down")
    ScalarGrid(4, 128, ragged_groups=True).check_shape(512, 1376, "layer.down")
    with pytest.raises(HarpqError, match="exceeds in_features"):
        ScalarGrid(4, 256).check_shape(8, 128, "x")
