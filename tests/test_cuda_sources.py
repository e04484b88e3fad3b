"""Every CUDA source compiles with NVRTC for sm_80 and sm_90 in every configuration a backend can ask for,
without a GPU; and the tables the E8P kernel reads decode exactly as the lattice definition says."""

import itertools

import pytest
import torch

from harpq.formats import ScalarGroups, TrellisTiles
from harpq.formats.lattice import e8_one_bit_points, e8p_decode
from harpq.formats.trellis import unit_values
from harpq.kernels import e8p_cuda, scalar_cuda, trellis_cuda


def test_e8p_field_tables_decode_every_code_exactly():
    codes = torch.arange(1 << 16)
    assert torch.equal(e8p_cuda.decode_fields(codes), e8p_decode(codes))


def test_e8_field_table_decodes_every_point_exactly():
    assert torch.equal(e8p_cuda.decode_e8_fields(torch.arange(256)).double(), e8_one_bit_points())


@pytest.mark.parametrize("bits,group,n,expect", [
    (4, 128, 4096, (4, 2, 1)), (4, 64, 4096, (2, 2, 1)), (2, 128, 11008, (2, 2, 1)), (2, 64, 4096, (1, 2, 1)),
    (1, 128, 4096, (1, 2, 1)), (8, 128, 4096, (4, 3, 1)), (3, 128, 4096, (3, 2, 1)), (4, 0, 11008, (4, 31, 1)),
    (4, 128, 1376, (1, 4, 1)), (3, 64, 4096, (3, 1, 0)), (1, 64, 4096, (2, 0, 0)), (2, 32, 512, (2, 0, 0)),
    (4, 100, 1000, None), (3, 128, 1376, None)])
def test_scalar_layout_choice(bits, group, n, expect):
    """Words per thread and step (as many as the width and the group allow), log2(runs per group), and
    whether a step lies in one group (scale per step) or only a thread's run does (scale per weight)."""
    assert scalar_cuda.layout(ScalarGroups(bits, group, "int"), n) == expect


BATCHES = (1, 5, 16)  # the three (MT, NT) regimes
ROWS = (64, 11008)  # one block per SM or fewer / many row tiles


@pytest.fixture(autouse=True)
def _no_gpu_needed(monkeypatch):
    monkeypatch.setattr("harpq.kernels.tuning._sm_count", lambda device_index: 132)


def _scalar_configs():
    seen = set()
    for bits, group, n, batch, zero, m in itertools.product((1, 2, 3, 4, 8), (16, 32, 64, 128, 0), (512, 4096, 11008),
                                                           BATCHES, ("int", "fp16"), ROWS):
        lay = scalar_cuda.layout(ScalarGroups(bits, group, zero), n)
        if lay:
            for tiled in (False, True):
                seen.add(scalar_cuda.defines(bits, zero == "int", lay[0], lay[2], m, n, batch, tiled=tiled))
            norm = batch <= scalar_cuda.NORM_MAX_BATCH  # the layer's RMSNorm folded in
            seen.add(scalar_cuda.defines(bits, zero == "int", lay[0], lay[2], m, n, batch, tiled=True, norm=norm))
            seen.add(scalar_cuda.defines(bits, zero == "int", lay[0], lay[2], m, n, batch, tiled=True, norm=norm,
                                         glu=True))  # a gate/up GEMV that stores silu(gate) · up
    return sorted(seen)


def _bulk_configs():
    """The scalar kernel with its weights through the TMA ring: one configuration per code path (bits, zeros,
    words per thread, step scale, tiles, slot steps, norm, gate/up)."""
    firsts = {}
    for bits, group, n, batch, zero, m in itertools.product((1, 2, 3, 4, 8), (16, 32, 64, 128, 0), (512, 4096, 11008),
                                                           BATCHES, ("int", "fp16"), ROWS):
        lay = scalar_cuda.layout(ScalarGroups(bits, group, zero), n)
        if not lay:
            continue
        for norm, glu in ((False, False), (batch <= scalar_cuda.NORM_MAX_BATCH, True)):
            d = scalar_cuda.defines(bits, zero == "int", lay[0], lay[2], m, n, batch, tiled=True, norm=norm, glu=glu,
                                    group_shift=lay[1], bulk=True)
            c = dict(d)
            if c.get("BULK"):
                key = tuple(c.get(k) for k in ("BITS", "INT_ZERO", "NW", "STEP_SCALE", "MT", "NT", "SLOT_STEPS",
                                               "NORM", "GLU"))
                firsts.setdefault(key, d)
    return sorted(firsts.values())


def _e8p_configs():
    return sorted({e8p_cuda.defines(s, e8p_cuda.layout(n, batch), m, n, batch, tiled=tiled)
                   for s, n, batch, m, tiled in itertools.product((0, 1, 2), (64, 128, 256, 4096), BATCHES, ROWS,
                                                                  (False, True))})


def _trellis_configs():
    plain = {trellis_cuda.defines(bits, code, m, n, batch)
             for bits, code, n, batch, m in itertools.product((2, 3, 4), ("3inst", "1mad"), (1376, 4096, 16 * 43),
                                                              BATCHES, ROWS)}
    shifted_one_by_one = {tuple(sorted({**dict(d), "PRESHIFT": 0}.items())) for d in plain if dict(d)["BITS"] == 2}
    return sorted(plain | shifted_one_by_one)


def _all_configs():
    return ([("scalar_gemv.cu", d) for d in _scalar_configs()] + [("e8p_gemv.cu", d) for d in _e8p_configs()]
            + [("trellis_gemv.cu", d) for d in _trellis_configs()])


@pytest.mark.parametrize("code", ["3inst", "1mad"])
def test_trellis_kernel_values_are_the_codes_values(code):
    """The kernel's two fp16 parts per state, summed and times its factor, are the format's unit-RMS code
    values for all 2^16 states (to fp32 rounding of the factor)."""
    got = trellis_cuda.kernel_values(code).double() * trellis_cuda.factor(code)
    assert torch.allclose(got, unit_values(code, 16).double(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_trellis_lanes_read_the_walk(bits):
    """Each lane's two words, shifted by its bit offset, hold the states of its eight walk positions,
    the last lane's wrapping to the tile's first word (tail-biting)."""
    fmt = TrellisTiles(bits)
    buffers = fmt.random_buffers(48, 80, torch.Generator().manual_seed(bits))
    assert torch.equal(trellis_cuda.lane_states(buffers["codes"], bits), fmt.walks(buffers))


@pytest.mark.parametrize("bits,n,expect", [(2, 4096, (8, 2)), (3, 4096, (8, 1)), (4, 11008, (8, 1)),
                                           (2, 1376, (2, 2)), (2, 16 * 43, (1, 1)), (3, 100, None)])
def test_trellis_layout_choice(bits, n, expect):
    """Tiles along K per step (the most of 8, 4, 2, 1 that divide n/16) and tiles per warp-wide load."""
    assert trellis_cuda.layout(bits, n) == expect


def _compile(job):
    from harpq.kernels.nvrtc import compile_cubin

    source, defines, arch = job
    return compile_cubin(source, dict(defines), arch)[:4]


def _compiles(configs, arch):
    """Compile every configuration, on all cores (NVRTC holds the interpreter while it compiles)."""
    pytest.importorskip("cuda.core")
    import concurrent.futures
    import multiprocessing
    import os

    jobs = [(source, defines, arch) for source, defines in configs]
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers < 2:
        heads = [_compile(job) for job in jobs]
    else:
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            heads = list(pool.map(_compile, jobs))
    for job, head in zip(jobs, heads, strict=True):
        assert head == b"\x7fELF", job[:2]


def test_every_kernel_configuration_compiles_for_sm_90():
    configs = _all_configs()
    assert len(configs) > 40
    _compiles(configs, "sm_90")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_the_tma_ring_configurations_compile(arch):
    """sm_90 builds the ring, every configuration; sm_80 has no TMA and compiles them to the register loads, where
    one per bit width and zero kind covers what differs."""
    configs = _bulk_configs()
    assert len(configs) > 20 and all(dict(d)["SLOTS"] >= 1 for d in configs)
    if arch == "sm_80":
        configs = sorted({(dict(d)["BITS"], dict(d)["INT_ZERO"]): d for d in configs}.values())
    _compiles([("scalar_gemv.cu", d) for d in configs], arch)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_the_hadamard_kernel_compiles(arch):
    _compiles([("hadamard.cu", ())], arch)


def test_each_format_compiles_for_sm_80():
    """sm_80 differs from sm_90 only where the sources test the architecture (programmatic dependent
    launch): one configuration per format and launch regime (batch, rows) is enough there."""
    firsts = {}
    for source, defines in _all_configs():
        d = dict(defines)
        key = (source, d.get("BITS"), d.get("INT_ZERO"), d.get("STAGE2"), d.get("CODE"), d["MT"], d["NT"])
        firsts.setdefault(key, (source, defines))
    assert len(firsts) > 15
    _compiles(list(firsts.values()), "sm_80")


def test_fp16_zeros_prefer_longer_runs_scaled_per_weight():
    """HQQ's fp16 zeros cost an fp16 operation per pair either way: four words per step, scale per pair."""
    assert scalar_cuda.layout(ScalarGroups(4, 64, "fp16"), 4096) == (4, 1, 0)
    assert scalar_cuda.layout(ScalarGroups(4, 64, "int"), 4096) == (2, 2, 1)


@pytest.mark.parametrize("shift", [0, 1, 2, 3, 5, 31])
@pytest.mark.parametrize("slot_steps,align", [(1, 1), (2, 1), (2, 2), (4, 4), (4, 2)])
def test_a_ring_slot_holds_every_metadata_group_its_steps_touch(shift, slot_steps, align):
    """The slot's metadata room (META_GROUPS) against a direct count over the runs of every slot a warp can
    start: at a multiple of `align` steps, 4 runs per step, group = run >> shift."""
    room = scalar_cuda.meta_groups(slot_steps, shift, align)
    touched = [len({run >> shift for run in range(4 * a, 4 * (a + slot_steps))}) for a in range(0, 512, align)]
    assert room == max(touched)


def test_the_ring_is_refused_where_rows_are_not_whole_chunks_and_sized_to_the_shared_memory():
    shape = {"MT": 1, "NT": 1, "WARPS": 8}
    assert scalar_cuda.bulk_defines(4, 4, 1376, 2, shape, 0) == {}  # 172 words: not whole 16-word chunks
    ring = scalar_cuda.bulk_defines(4, 4, 4096, 2, shape, 0)
    slot_bytes = 4 * (ring["SLOT_STEPS"] * 16 * 16 + 16 * ring["META_GROUPS"])
    assert ring["BULK"] == 1 and 1 <= ring["SLOTS"] and 8 * ring["SLOTS"] * slot_bytes <= 48 * 1024
    with_norm = scalar_cuda.bulk_defines(4, 4, 4096, 2, shape, 16 * 1024)  # the folded norm's copy takes its share
    assert with_norm["SLOTS"] <= ring["SLOTS"]


def test_the_ring_is_taken_only_where_it_measured_faster(monkeypatch):
    monkeypatch.setattr("harpq.kernels.tuning._sm_count", lambda device_index: 132)
    from harpq.kernels import tuning

    assert tuning.ring_pays(4096, 11008 // 128, 1)  # the down projection at batch 1
    assert not tuning.ring_pays(4096, 11008 // 128, 4)
    assert not tuning.ring_pays(12288, 4096 // 128, 1)  # many row tiles
    assert not tuning.ring_pays(4096, 4096 // 128, 1)  # short rows


def test_the_tail_split_evens_the_last_round_and_keeps_one_wave():
    from harpq.kernels import tuning

    # 11008 rows at one m-tile: 688 blocks on 132 SMs, 28 left after 5 rounds -> quarters on 112 SMs
    assert tuning.tail_split(688, 132, 6, 32, 4) == (28, 4)
    assert tuning.tail_split(344, 132, 4, 32, 4) == (80, 3)  # two m-tiles: 80 left, thirds (two on some SMs)
    assert tuning.tail_split(768, 132, 6, 32, 4) == (0, 1)  # 108 left: halves would load an SM with a whole block
    assert tuning.tail_split(264, 132, 2, 32, 4) == (0, 1)  # nothing left over
    assert tuning.tail_split(688, 132, 5, 32, 4) == (0, 1)  # more than one wave
    assert tuning.tail_split(688, 132, 6, 8, 4) == (28, 2)  # every part keeps a step per warp
    for blocks in range(1, 1200, 7):
        for resident in (1, 2, 4, 6, 8):
            split, q = tuning.tail_split(blocks, 132, resident, 32, 4)
            rounds, left = divmod(blocks, 132)
            if q == 1:
                assert split == 0
                continue
            per_sm = -(-left * q // 132)
            assert split == left and per_sm < q and rounds + per_sm <= resident and 32 >= q * 4


@pytest.mark.parametrize("m", [48, 40])
def test_prepared_metadata_is_tile_major_and_padded_to_whole_tiles(m):
    """The kernel reads (scale, zero) of row r, group g at word ((r // 16) · groups + g) · 16 + r % 16."""
    fmt = ScalarGroups(4, 128, "int")
    buffers = fmt.random_buffers(m, 512, torch.Generator().manual_seed(m))
    (meta,) = scalar_cuda.ScalarCuda().prepare(fmt, buffers, m, 512)
    scale, zero = fmt.scale_zero(buffers, m, 512)
    words = meta.reshape(-1)
    assert meta.shape == (-(-m // 16), 4, 16)
    for r in range(m):
        for g in range(4):
            at = ((r // 16) * 4 + g) * 16 + r % 16
            pair = words[at:at + 1].view(torch.float16)
            assert pair.tolist() == [scale[r, g].item(), zero[r, g].item()]
    if m % 16:  # the last tile's rows past m are zeros
        assert not meta[-1, :, m % 16:].any()
