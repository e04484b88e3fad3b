"""The CUDA decode GEMVs against their PyTorch reference (decode, then matmul), on random codes.

Runs where a CUDA GPU and cuda-core are present (through the `device` tool); skipped elsewhere. Same codes
in, outputs within fp16 rounding: the kernels round each weight to fp16 once (scalar grids with integer
zeros: exactly fp16(W)), multiply on tensor cores with fp32 accumulation and round y to fp16.
"""

import pytest
import torch

from harpq.formats import E8PStages, ScalarGroups, TrellisTiles
from harpq.kernels import nvrtc, scalar_cuda, select

if nvrtc.available():
    pytest.skip(f"CUDA kernels cannot run here: {nvrtc.available()}", allow_module_level=True)


def random_buffers(fmt, m, n, seed):
    return fmt.random_buffers(m, n, torch.Generator(device="cuda").manual_seed(seed), "cuda")


def check(fmt, m, n, batch, seed=0, tol=2e-3):
    buffers = random_buffers(fmt, m, n, seed)
    x = torch.randn(batch, n, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed + 1)).half()
    backend = select(fmt, x, m, n)
    assert backend.name == "cuda", backend.unusable(fmt, x, m, n)
    y = backend.matmul(fmt, buffers, backend.prepare(fmt, buffers, m, n), x, m, n)
    ref = x.double() @ fmt.decode(buffers, m, n).double().T
    assert y.shape == (batch, m) and y.dtype == torch.float16
    assert torch.isfinite(y).all()
    err = (y.double() - ref).norm() / ref.norm()
    worst = ((y.double() - ref).abs() / (ref.abs() + 0.05 * ref.abs().max())).max()
    assert err < tol and worst < 10 * tol, (float(err), float(worst))
    return y


SCALAR = [(bits, g, zero) for bits in (1, 2, 3, 4, 8) for g, zero in ((128, "int"), (64, "fp16"), (0, "mid"))]


@pytest.mark.parametrize("bits,group,zero", SCALAR)
@pytest.mark.parametrize("batch", [1, 5, 16])
def test_scalar_kernel_matches_reference(bits, group, zero, batch):
    check(ScalarGroups(bits, group, zero), 40, 1024, batch, seed=bits * 7 + batch)


@pytest.mark.parametrize("bits,n,group", [(4, 4096, 128), (4, 11008, 128), (2, 4096, 128), (2, 11008, 64),
                                          (3, 4096, 128), (4, 1376, 32), (2, 512, 32), (8, 4096, 128),
                                          (3, 4096, 32), (1, 4096, 64), (4, 4096, 16)])
@pytest.mark.parametrize("batch", [1, 9])
@pytest.mark.parametrize("row_tile", [16, 0])
def test_scalar_kernel_real_shapes_and_narrow_layouts(bits, n, group, batch, row_tile):
    """Model widths, widths/groups that force fewer words per thread (NW = 2, 1; a short last chunk of the
    row-tiled layout), and groups smaller than a step (the scale then multiplies each weight pair); codes
    row-tiled and one row after another."""
    check(ScalarGroups(bits, group, "int", row_tile), 272, n, batch, seed=n + bits)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m,n", [(40, 4096), (33, 11008), (16, 384), (24, 192), (32, 4096), (48, 4160), (272, 1088)])
@pytest.mark.parametrize("batch", [1, 8, 12, 16])
@pytest.mark.parametrize("row_tile", [16, 0])
def test_e8p_kernel_matches_reference(bits, m, n, batch, row_tile):
    """Words per thread NW = 4, 4, 2, 1, 4, 1, 1; codes row-tiled where the rows are a multiple of 16 (16 × 384,
    48 × 4160 and 272 × 1088 end their rows with a short chunk) and, for `row_tile` 0, one row after another."""
    check(E8PStages(bits, {2: None, 3: 2.04, 4: 3.45}[bits], row_tile), m, n, batch, seed=bits + m + batch)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("code", ["3inst", "1mad"])
@pytest.mark.parametrize("m,n", [(48, 4096), (32, 1376), (16, 16 * 43), (272, 512)])  # G 8, 2, 1; MT 2
@pytest.mark.parametrize("batch", [1, 9, 16])
def test_trellis_kernel_matches_reference(bits, code, m, n, batch):
    check(TrellisTiles(bits, 16, code), m, n, batch, seed=bits + m + batch)


@pytest.mark.parametrize("code", ["3inst", "1mad"])
@pytest.mark.parametrize("m,n", [(48, 4096), (272, 512), (11008, 4096)])
@pytest.mark.parametrize("batch", [1, 16])
def test_trellis_kernel_with_states_shifted_one_by_one(code, m, n, batch, monkeypatch):
    """The 2-bit states each shifted and masked out of the lane's window (the default takes them out of three
    pre-shifted copies by one prmt each)."""
    from harpq.kernels import tuning

    monkeypatch.setitem(tuning.OVERRIDE, "PRESHIFT", 0)
    check(TrellisTiles(2, 16, code), m, n, batch, seed=m + batch)


def test_trellis_kernel_many_rows():
    """Enough row tiles for the launch shapes of large matrices (one wave, two m-tiles)."""
    for batch in (1, 4):
        check(TrellisTiles(2), 11008, 4096, batch, seed=batch)


@pytest.mark.parametrize("fmt", [ScalarGroups(4, 128, "int"), E8PStages(3, 2.04), TrellisTiles(2)])
def test_residual_is_added_in_the_kernel(fmt):
    m, n = 48, 1024
    buffers = random_buffers(fmt, m, n, 5)
    x = torch.randn(3, n, device="cuda").half()
    r = torch.randn(3, m, device="cuda").half()
    backend = select(fmt, x, m, n)
    prepared = backend.prepare(fmt, buffers, m, n)
    got = backend.matmul(fmt, buffers, prepared, x, m, n, residual=r)
    want = backend.matmul(fmt, buffers, prepared, x, m, n).float() + r.float()
    assert (got.float() - want).abs().max() <= 2e-3 * want.abs().max()


BULK_CAPABLE = torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.skipif(not BULK_CAPABLE, reason="the TMA ring needs sm_90")
@pytest.mark.parametrize("fmt", [ScalarGroups(4, 128, "int"), ScalarGroups(4, 64, "fp16"), ScalarGroups(2, 128, "int"),
                                 ScalarGroups(3, 128, "int"), ScalarGroups(4, 32, "int"), ScalarGroups(2, 0, "mid"),
                                 ScalarGroups(8, 128, "int"), ScalarGroups(2, 64, "int")])
@pytest.mark.parametrize("m,n", [(272, 4096), (4096, 4096), (11008, 4096), (4096, 11008), (48, 1024), (16, 768)])
@pytest.mark.parametrize("batch", [1, 2, 16])
def test_scalar_kernel_through_the_tma_ring_matches_reference(fmt, m, n, batch, monkeypatch):
    """Weights through the TMA ring: warps' runs of steps that do not divide evenly, slots of one and two
    steps, groups smaller and larger than a step, one to four steps per chunk (NW 4, 2, 1), two m-tiles."""
    monkeypatch.setattr(scalar_cuda, "BULK", True)
    nw, shift, step_scale = scalar_cuda.layout(fmt, n)
    d = dict(scalar_cuda.defines(fmt.bits, fmt.zero == "int", nw, step_scale, m, n, batch, tiled=True,
                                 group_shift=shift, bulk=True))
    assert d.get("BULK") == 1 and d["SLOTS"] >= 1, d
    check(fmt, m, n, batch, seed=m + n + batch)


@pytest.mark.parametrize("bulk", [False, True])
@pytest.mark.parametrize("fmt", [ScalarGroups(4, 128, "int"), ScalarGroups(2, 128, "int"), ScalarGroups(3, 128, "int"),
                                 ScalarGroups(4, 64, "fp16"), ScalarGroups(4, 128, "int", 0)])
@pytest.mark.parametrize("m,n", [(48, 1024), (12288, 4096), (272, 4224), (64, 8192)])  # 8 / 4 warps, 33 chunks, 70B
@pytest.mark.parametrize("batch", [1, 2])
def test_folded_rms_norm_equals_the_norm_then_the_gemv(fmt, m, n, batch, bulk, monkeypatch):
    """The kernel that takes the layer's RMSNorm weight computes W · RMSNorm(x) (Llama's norm, statistics in
    fp32) for rows of very different scale, and with the residual added in the same store."""
    from harpq.kernels.fused import rms_norm_reference

    monkeypatch.setattr(scalar_cuda, "BULK", bulk and BULK_CAPABLE)
    buffers = random_buffers(fmt, m, n, batch + m)
    gen = torch.Generator(device="cuda").manual_seed(batch)
    scales = torch.tensor([0.02, 40.0][:batch], device="cuda")[:, None]  # rows of very different rms
    x = torch.randn(batch, n, device="cuda", generator=gen) * scales
    x[:, 7] = 200.0  # an outlier channel, as Llama's residual stream has
    x = x.half()
    weight = (torch.rand(n, device="cuda", generator=gen) * 2).half()
    residual = torch.randn(batch, m, device="cuda", generator=gen).half()
    backend = select(fmt, x, m, n)
    if not backend.folds_norm(x):  # two rows of 8192 and the weight: 48 KB, more than the fold may take
        assert (batch + 1) * n * 2 > nvrtc.NORM_SHARED_LIMIT
        return
    prepared = backend.prepare(fmt, buffers, m, n)
    w = fmt.decode(buffers, m, n).double()
    ref = rms_norm_reference(x, weight, 1e-5).double() @ w.T
    got = backend.matmul(fmt, buffers, prepared, x, m, n, norm=(weight, 1e-5))
    err = (got.double() - ref).norm(dim=1) / ref.norm(dim=1)
    assert err.max() < 3e-3, err
    both = backend.matmul(fmt, buffers, prepared, x, m, n, residual=residual, norm=(weight, 1e-5))
    assert (both.double() - ref - residual.double()).norm() / ref.norm() < 3e-3


def test_folded_norm_is_refused_beyond_its_batch_and_for_the_wrong_weight():
    fmt = ScalarGroups(4, 128, "int")
    buffers = random_buffers(fmt, 32, 512, 0)
    backend = select(fmt, torch.zeros(3, 512, device="cuda").half(), 32, 512)
    prepared = backend.prepare(fmt, buffers, 32, 512)
    assert not backend.folds_norm(torch.zeros(3, 512, device="cuda").half())
    with pytest.raises(ValueError, match="at most 2 rows"):
        backend.matmul(fmt, buffers, prepared, torch.zeros(3, 512, device="cuda").half(), 32, 512,
                       norm=(torch.ones(512, device="cuda").half(), 1e-5))
    with pytest.raises(ValueError, match="norm weight of shape"):
        backend.matmul(fmt, buffers, prepared, torch.zeros(1, 512, device="cuda").half(), 32, 512,
                       norm=(torch.ones(256, device="cuda").half(), 1e-5))


@pytest.mark.parametrize("fmt", [ScalarGroups(4, 128, "int"), ScalarGroups(2, 128, "int"), ScalarGroups(3, 128, "int"),
                                 ScalarGroups(4, 64, "fp16"), ScalarGroups(4, 128, "int", 0)])
@pytest.mark.parametrize("f,n", [(96, 1024), (11008, 4096), (1024, 4160)])
@pytest.mark.parametrize("batch", [1, 2, 9, 16])
@pytest.mark.parametrize("bulk", [False, True])
def test_gate_up_gemv_stores_silu_gate_times_up(fmt, f, n, batch, bulk, monkeypatch):
    """With `glu` the GEMV of a stacked [gate; up] matrix (2F rows) returns silu(gate) · up (B × F), the norm
    folded in too where the batch allows."""
    from harpq.kernels.fused import rms_norm_reference

    monkeypatch.setattr(scalar_cuda, "BULK", bulk and BULK_CAPABLE)
    m = 2 * f
    buffers = random_buffers(fmt, m, n, f + batch)
    gen = torch.Generator(device="cuda").manual_seed(batch)
    x = (torch.randn(batch, n, device="cuda", generator=gen) * 4).half()
    backend = select(fmt, x, m, n)
    if scalar_cuda.layout(fmt, n) is None:  # 3-bit runs of 32 columns do not tile 4160: the reference, no fold
        assert backend.name != "cuda" and not backend.folds_glu(x, m)
        return
    assert backend.folds_glu(x, m)
    prepared = backend.prepare(fmt, buffers, m, n)
    w = fmt.decode(buffers, m, n).double()
    z = x.double() @ w.T
    ref = torch.nn.functional.silu(z[:, :f]) * z[:, f:]
    got = backend.matmul(fmt, buffers, prepared, x, m, n, glu=True)
    assert got.shape == (batch, f)
    assert (got.double() - ref).norm() / ref.norm() < 3e-3
    if backend.folds_norm(x):
        weight = (torch.rand(n, device="cuda", generator=gen) + 0.5).half()
        z = rms_norm_reference(x, weight, 1e-5).double() @ w.T
        ref = torch.nn.functional.silu(z[:, :f]) * z[:, f:]
        got = backend.matmul(fmt, buffers, prepared, x, m, n, glu=True, norm=(weight, 1e-5))
        assert (got.double() - ref).norm() / ref.norm() < 3e-3


@pytest.mark.parametrize("batch", [1, 2, 7])
def test_quant_linear_glu_folds_the_norm_and_silu_where_its_kernel_can(batch):
    """QuantLinear.glu(x, norm=...) equals silu(gate) · up of QuantLinear(RMSNorm(x)): one kernel, the norm in it
    at batch ≤ 2 and its own kernel first beyond."""
    from harpq.engine.bench import random_quant_linear
    from harpq.kernels.fused import rms_norm_reference

    gen = torch.Generator(device="cuda").manual_seed(batch)
    module = random_quant_linear("rtn", {"bits": 4}, 96, 1024, "m", torch.device("cuda"), gen)
    x = (torch.randn(batch, 1024, device="cuda", generator=gen) * 3).half()
    weight = (torch.rand(1024, device="cuda", generator=gen) + 0.5).half()
    z = module(rms_norm_reference(x, weight, 1e-6)).double()
    want = torch.nn.functional.silu(z[:, :48]) * z[:, 48:]
    glu = module.glu(x, norm=(weight, 1e-6)).double()
    assert glu.shape == (batch, 48) and (glu - want).norm() / want.norm() < 3e-3


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("family", ["e8p", "qtip"])
def test_stacked_matrices_keep_their_own_scales(bits, batch, family):
    fmt = E8PStages(bits, {2: None, 4: 3.45}[bits]) if family == "e8p" else TrellisTiles(bits)
    n = 1024
    parts = [(random_buffers(fmt, m, n, 20 + i), m) for i, m in enumerate((48, 16, 32))]
    for i, (b, _) in enumerate(parts):
        b["scales"] = torch.full((1, 1), 0.5 * (i + 1), dtype=torch.float16, device="cuda")
    stacked = fmt.concat_rows(parts, n)
    x = torch.randn(batch, n, device="cuda").half()
    backend = select(fmt, x, 96, n)
    assert backend.name == "cuda"
    got = backend.matmul(fmt, stacked, backend.prepare(fmt, stacked, 96, n), x, 96, n).float()
    want = torch.cat([x.float() @ fmt.decode(b, m, n).T for b, m in parts], dim=1)
    assert (got - want).abs().max() <= 2e-3 * want.abs().max()


def test_unsupported_layouts_fall_back_to_the_reference():
    x = torch.randn(1, 200, device="cuda").half()
    assert select(ScalarGroups(4, 100, "int"), x, 8, 200).name == "reference"
    assert select(E8PStages(2, None), torch.randn(1, 200, device="cuda").half(), 8, 200).name == "reference"
    x = torch.randn(1, 512, device="cuda").half()
    assert select(TrellisTiles(2, 16, "hyb"), x, 16, 512).name == "reference"  # a table per matrix
    assert select(TrellisTiles(2, 12, "3inst"), x, 16, 512).name == "reference"  # the kernel decodes L = 16
    assert select(ScalarGroups(4, 128, "int"), torch.randn(1, 4096, device="cuda").bfloat16(), 8, 4096).name \
        == "reference"
    assert select(ScalarGroups(4, 128, "int"), torch.randn(17, 4096, device="cuda").half(), 8, 4096).name \
        == "reference"


def test_kernels_are_captured_by_cuda_graphs():
    fmt = E8PStages(4, 3.45)
    m, n = 64, 1024
    buffers = random_buffers(fmt, m, n, 3)
    x = torch.randn(2, n, device="cuda").half()
    backend = select(fmt, x, m, n)
    prepared = backend.prepare(fmt, buffers, m, n)
    backend.matmul(fmt, buffers, prepared, x, m, n)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = backend.matmul(fmt, buffers, prepared, x, m, n)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    ref = x.double() @ fmt.decode(buffers, m, n).double().T
    assert (y.double() - ref).norm() / ref.norm() < 2e-3


@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("fmt", [ScalarGroups(2, 128, "int"), E8PStages(2, None)])
def test_a_chain_of_dependent_gemvs_reads_each_input_after_its_producer(fmt, pdl, monkeypatch):
    """Each GEMV's input is the previous GEMV's output and it adds the output before that as its residual;
    with programmatic dependent launch a kernel starts before its producer ends, so reading x or the residual
    too early gives wrong numbers here. Large square matrices (many blocks) in a CUDA graph, scaled to unit
    gain, against the same chain in float64 from the decoded weights."""
    if pdl and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90")
    monkeypatch.setattr(nvrtc, "PDL", pdl)
    n, depth = 4096, 6
    sets = []
    for i in range(depth):
        b = random_buffers(fmt, n, n, 40 + i)
        gain = float(fmt.decode(b, n, n).double().norm()) / n**0.5  # |W x| ≈ gain |x| for random x
        b["scales"] = (b["scales"].double() / gain).half()
        sets.append(b)
    x = torch.randn(1, n, device="cuda").half()
    backend = select(fmt, x, n, n)
    prepared = [backend.prepare(fmt, b, n, n) for b in sets]

    def chain():
        ys = [x]
        for i, (b, p) in enumerate(zip(sets, prepared, strict=True)):
            ys.append(backend.matmul(fmt, b, p, ys[-1], n, n, residual=ys[-2] if i else None))
        return ys[1:]

    chain()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ys = chain()
    for trial in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        ref = [x.double()]
        for i, b in enumerate(sets):
            ref.append(ref[-1] @ fmt.decode(b, n, n).double().T + (ref[-2] if i else 0))
        for i, (got, want) in enumerate(zip(ys, ref[1:], strict=True)):
            assert (got.double() - want).norm() / want.norm() < 1e-2, (trial, i)


@pytest.mark.parametrize("method,bits", [("rtn", 4), ("gptq", 3), ("hqq", 4), ("quipsharp", 2), ("quipsharp", 4)])
def test_quant_linear_uses_the_cuda_kernel(method, bits):
    from helpers import random_hessian

    import harpq
    from harpq.pipeline.linear import quantize_linear

    torch.manual_seed(0)
    w, h = torch.randn(48, 512) * 0.02, random_hessian(512, tokens=1024)
    module, _ = quantize_linear("m", w, None if method in ("rtn", "hqq") else h,
                                harpq.Recipe.preset(method, bits=bits).for_module("m"))
    module = module.cuda()
    x = torch.randn(3, 512, device="cuda").half()
    assert select(module.format, x, 48, 512).name == "cuda"
    module.use_kernels = False
    ref = module(x).float()
    module.use_kernels = None
    got = module(x).float()
    assert (got - ref).norm() / ref.norm() < 3e-3


@pytest.mark.parametrize("n", [256, 512, 1024, 4096, 8192])
@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("transpose", [False, True])
def test_one_launch_hadamard_matches_the_definition_and_the_stage_kernels(n, rows, transpose):
    from harpq.hadamard import hadamard_transform
    from harpq.kernels import hadamard_cuda
    from harpq.kernels.stages import stage_product
    from harpq.processors import make_processor

    p = make_processor({"name": "rht", "seed": n})
    plan = p.stage_plans({k: v.cuda() for k, v in p.init_buffers(n, n).items()}, n, n)[1]
    assert plan.sylvester
    x = torch.randn(rows, n, device="cuda").half()
    s = plan.signs.double()
    want = s * hadamard_transform(x.double()) if transpose else hadamard_transform(x.double() * s)
    got = hadamard_cuda.hadamard_rows(x, plan.signs, transpose)
    assert (got.double() - want).norm() / want.norm() < 2e-3
    staged = stage_product(x, plan.signs, plan.blocks, plan.table, transpose)
    assert (got.double() - staged.double()).abs().max() <= 2e-3 * want.abs().max()


def force_tail_split(monkeypatch, parts: int) -> list:
    """Pretend 5 SMs and split every grid's left-over blocks into `parts` (whatever the occupancy: a part never
    waits for another, so any split is correct); returns the list the launches' split arguments go to."""
    from harpq.kernels import tuning

    monkeypatch.setattr(tuning, "_sm_count", lambda device_index: 5)
    monkeypatch.setitem(tuning.OVERRIDE, "TAIL_SPLIT", 1)  # every format, whatever its default
    monkeypatch.setattr(tuning, "tail_split",
                        lambda blocks, sms, *rest, **kw: (blocks % sms, parts if blocks % sms else 1))
    taken = []
    split = nvrtc.gemv_split
    monkeypatch.setattr(nvrtc, "gemv_split", lambda *a, **k: taken.append(split(*a, **k)) or taken[-1])
    return taken


@pytest.mark.parametrize("fmt", [ScalarGroups(4, 128, "int"), ScalarGroups(2, 128, "int"), ScalarGroups(3, 128, "int"),
                                 ScalarGroups(4, 64, "fp16"), ScalarGroups(2, 0, "mid"), E8PStages(2, None, 0),
                                 E8PStages(4, 3.45), TrellisTiles(2), TrellisTiles(3, 16, "1mad")])
@pytest.mark.parametrize("m,n,parts", [(272, 4096, 3), (112, 1024, 2), (208, 2048, 7)])
@pytest.mark.parametrize("batch", [1, 5, 16])
def test_tail_split_blocks_sum_their_parts(fmt, m, n, parts, batch, monkeypatch):
    """The last row blocks split along K (parts of unequal steps; at 7 parts fewer steps than warps) sum their
    parts in the shared workspace: the results equal the reference, and bit for bit the next call's (the last
    part leaves the workspace and its counter at zero); the residual is added by the part that stores."""
    taken = force_tail_split(monkeypatch, parts)
    first = check(fmt, m, n, batch, seed=m + batch)
    assert any(int(args[0]) > 0 and int(args[1]) == parts for _, args in taken), taken
    assert torch.equal(check(fmt, m, n, batch, seed=m + batch), first)
    buffers = random_buffers(fmt, m, n, 3)
    x = torch.randn(batch, n, device="cuda").half()
    r = torch.randn(batch, m, device="cuda").half()
    backend = select(fmt, x, m, n)
    prepared = backend.prepare(fmt, buffers, m, n)
    got = backend.matmul(fmt, buffers, prepared, x, m, n, residual=r)
    want = backend.matmul(fmt, buffers, prepared, x, m, n).float() + r.float()
    assert (got.float() - want).abs().max() <= 2e-3 * want.abs().max()


@pytest.mark.parametrize("batch", [1, 2, 9])
def test_tail_split_of_the_gate_up_gemv_with_its_norm(batch, monkeypatch):
    """The gate/up GEMV (SiLU·up in the store, the norm folded at batch ≤ 2) with its last blocks split."""
    from harpq.kernels.fused import rms_norm_reference

    taken = force_tail_split(monkeypatch, 3)
    fmt, f, n = ScalarGroups(4, 128, "int"), 352, 2048  # 22 blocks of gate and up rows: 4 rounds and 2 left
    m = 2 * f
    buffers = random_buffers(fmt, m, n, batch)
    x = (torch.randn(batch, n, device="cuda") * 4).half()
    weight = (torch.rand(n, device="cuda") + 0.5).half()
    backend = select(fmt, x, m, n)
    prepared = backend.prepare(fmt, buffers, m, n)
    norm = (weight, 1e-5) if backend.folds_norm(x) else None
    z = (rms_norm_reference(x, weight, 1e-5) if norm else x).double() @ fmt.decode(buffers, m, n).double().T
    ref = torch.nn.functional.silu(z[:, :f]) * z[:, f:]
    for _ in range(2):
        got = backend.matmul(fmt, buffers, prepared, x, m, n, glu=True, norm=norm)
        assert (got.double() - ref).norm() / ref.norm() < 3e-3
    assert any(int(args[0]) > 0 for _, args in taken), taken
