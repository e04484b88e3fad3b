"""Storage formats on the CPU: random valid buffers, stacking rows, and which backend runs a call."""

import logging

import pytest
import torch

from harpq.formats import E8PStages, ScalarGroups, TrellisTiles
from harpq.kernels import backends as registry
from harpq.kernels import backends_for, select
from harpq.kernels.backends import REFERENCE

FORMATS = [ScalarGroups(4, 64, "int"), ScalarGroups(3, 32, "fp16"), ScalarGroups(2, 0, "mid"), E8PStages(2, None),
           E8PStages(3, 2.04), E8PStages(4, 3.45)]


@pytest.mark.parametrize("fmt", FORMATS, ids=repr)
def test_random_buffers_match_the_specs_and_decode(fmt):
    gen = torch.Generator().manual_seed(0)
    buffers = fmt.random_buffers(24, 256, gen)
    specs = fmt.buffer_specs(24, 256)
    assert {k: (tuple(v.shape), v.dtype) for k, v in buffers.items()} == specs
    w = fmt.decode(buffers, 24, 256)
    assert w.shape == (24, 256) and torch.isfinite(w).all() and w.abs().sum() > 0


@pytest.mark.parametrize("zero", ["int", "fp16"])
@pytest.mark.parametrize("row_tile,rows", [(0, (8, 5, 11)), (16, (16, 48, 32))])  # 5·3 zeros: words straddle
def test_scalar_rows_stack_exactly(zero, row_tile, rows):
    fmt = ScalarGroups(3, 64, zero, row_tile)
    gen = torch.Generator().manual_seed(1)
    parts = [(fmt.random_buffers(m, 192, gen), m) for m in rows]
    stacked = fmt.concat_rows(parts, 192)
    want = torch.cat([fmt.decode(b, m, 192) for b, m in parts])
    assert torch.equal(fmt.decode(stacked, sum(rows), 192), want)


def test_row_tiled_matrices_with_a_partial_tile_do_not_stack():
    fmt = ScalarGroups(4, 64, "int")
    gen = torch.Generator().manual_seed(1)
    assert fmt.concat_rows([(fmt.random_buffers(m, 128, gen), m) for m in (16, 8)], 128) is None


@pytest.mark.parametrize("bits,n", [(4, 256), (4, 384), (3, 416), (2, 4096), (1, 1056)])
@pytest.mark.parametrize("m", [48, 40])
def test_row_tiled_codes_decode_as_the_rows_they_hold(bits, n, m):
    """The same codes stored row-tiled (rows a multiple of 16) and one row after another decode to the same
    weights; the tiled words sit where the decode kernel looks for them (chunk c of row r of tile T at
    T·16·w + c·16·C + (r mod 16)·width + offset, a shorter last chunk included)."""
    gen = torch.Generator().manual_seed(bits + n)
    codes = torch.randint(0, 1 << bits, (m, n), generator=gen)
    scale, zero = torch.rand(m, n // 32, generator=gen) + 0.1, torch.randint(0, 1 << bits, (m, n // 32), generator=gen)
    rows, tiled = ScalarGroups(bits, 32, "int", 0), ScalarGroups(bits, 32, "int", 16)
    a, b = rows.encode(codes, scale, zero), tiled.encode(codes, scale, zero)
    assert torch.equal(rows.decode(a, m, n), tiled.decode(b, m, n))
    assert tiled.tiled(m) == (m % 16 == 0)
    if not tiled.tiled(m):
        assert torch.equal(a["codes"], b["codes"])
        return
    w = a["codes"].shape[1]
    chunk = 12 if bits == 3 else 16
    flat = b["codes"].flatten()
    for r in range(m):
        for c in range(-(-w // chunk)):
            width = min(chunk, w - c * chunk)
            at = r // 16 * 16 * w + c * 16 * chunk + r % 16 * width
            assert torch.equal(flat[at:at + width], a["codes"][r, c * chunk:c * chunk + width])


def test_checkpoints_from_before_the_row_tiles_read_rows():
    """A saved scalar or e8p codebook config without `row_tile` means the rows-one-after-another layout."""
    from harpq.codebooks import make_codebook, saved_codebook

    old = {"name": "scalar", "bits": 4, "group_size": 128, "ragged_groups": False, "scale": "minmax"}
    assert saved_codebook(old).storage.row_tile == 0
    assert make_codebook(old).storage.row_tile == 16  # what a new quantization writes
    new = make_codebook(old).config()
    assert saved_codebook(new).storage.row_tile == 16 and new["row_tile"] == 16
    with pytest.raises(ValueError, match="row tile 8"):
        ScalarGroups(4, 128, "int", 8)
    e8p = {"name": "e8p", "bits": 4, "scale": 1.03, "resid_scale": None}
    assert saved_codebook(e8p).storage.row_tile == 0 and make_codebook(e8p).storage.row_tile == 16
    assert make_codebook({**e8p, "bits": 2}).storage.row_tile == 0  # rows measured faster at 2 bits


def test_scalar_grids_with_a_scale_per_matrix_do_not_stack():
    fmt = ScalarGroups(4, 0, "mid")
    assert fmt.concat_rows([(fmt.random_buffers(8, 64, torch.Generator().manual_seed(2)), 8)] * 2, 64) is None


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("row_tile,rows", [(0, (8, 16)), (16, (16, 32))])
def test_e8p_matrices_stack_with_a_scale_per_row(bits, row_tile, rows):
    fmt = E8PStages(bits, {2: None, 3: 2.04, 4: 3.45}[bits], row_tile)
    gen = torch.Generator().manual_seed(3)
    parts = [(fmt.random_buffers(m, 320, gen), m) for m in rows]  # 40 codes a row: a short last chunk
    parts[1][0]["scales"] = parts[0][0]["scales"] * 3  # the matrices' scales differ
    stacked = fmt.concat_rows(parts, 320)
    assert stacked["scales"].shape == (sum(rows), 1)
    want = torch.cat([fmt.decode(b, m, 320) for b, m in parts])
    assert torch.equal(fmt.decode(stacked, sum(rows), 320), want)
    if row_tile:
        assert fmt.concat_rows([parts[0], (fmt.random_buffers(8, 320, gen), 8)], 320) is None


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_e8p_row_tiled_codes_decode_as_the_rows_they_hold(bits):
    from harpq.formats.packing import to_row_tiles

    rows, tiled = (E8PStages(bits, {2: None, 3: 2.04, 4: 3.45}[bits], t) for t in (0, 16))
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(-2**15, 2**15, (32, 40), generator=gen)
    codes2 = torch.randint(0, 256 if bits == 3 else 2**15, (32, 40), generator=gen) if bits > 2 else None
    a, b = rows.encode(codes, codes2, torch.ones(1, 1)), tiled.encode(codes, codes2, torch.ones(1, 1))
    assert torch.equal(rows.decode(a, 32, 320), tiled.decode(b, 32, 320))
    for name in a:
        if name != "scales":
            assert torch.equal(b[name], to_row_tiles(a[name], 16, 32)) and not torch.equal(b[name], a[name])


def test_cpu_calls_run_the_reference_and_say_why_once(caplog):
    fmt = E8PStages(2, None)
    x = torch.randn(2, 64)
    with caplog.at_level(logging.INFO, logger="harpq.kernels"):
        registry._ANNOUNCED.clear()
        assert select(fmt, x, 8, 64) is REFERENCE
        assert select(fmt, x, 8, 64) is REFERENCE
    said = [r.getMessage() for r in caplog.records if "reference" in r.getMessage()]
    assert len(said) == 1 and "not on a CUDA device" in said[0]
    assert [b.name for b in backends_for(fmt.name)] == ["cuda", "reference"]
    assert select(fmt, x, 8, 64, fast=False) is REFERENCE


def test_reference_backend_adds_the_residual():
    fmt = ScalarGroups(4, 64, "int")
    buffers = fmt.random_buffers(8, 128, torch.Generator().manual_seed(3))
    x, r = torch.randn(3, 128), torch.randn(3, 8)
    want = x @ fmt.decode(buffers, 8, 128).T + r
    assert torch.allclose(REFERENCE.matmul(fmt, buffers, (), x, 8, 128, residual=r), want)


@pytest.mark.parametrize("fmt", [ScalarGroups(4, 64, "int"), ScalarGroups(3, 32, "fp16"), E8PStages(2, None),
                                 E8PStages(4, 3.45), TrellisTiles(2)])
def test_row_concatenated_tensors_are_plain_concatenations(fmt):
    """What a format lists as row-concatenated is exactly the members' tensors one after another (so members
    may become views of the stacked matrix); packed streams such as integer zeros are not listed."""
    gen = torch.Generator().manual_seed(0)
    parts = [(fmt.random_buffers(m, 256, gen), m) for m in (48, 16, 32)]
    stacked = fmt.concat_rows(parts, 256)
    assert fmt.row_concatenated() and set(fmt.row_concatenated()) <= set(stacked)
    for name in fmt.row_concatenated():
        assert torch.equal(stacked[name], torch.cat([b[name] for b, _ in parts]))
    if isinstance(fmt, ScalarGroups) and fmt.zero == "int":
        assert "zeros" not in fmt.row_concatenated()
