"""Triton kernels against the PyTorch reference (decode, then matmul): CPU via the interpreter, or CUDA."""

import os

import pytest
import torch
from helpers import random_hessian

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and Triton's interpreter is off", allow_module_level=True)

import harpq  # noqa: E402
from harpq.codebooks import ScalarGrid  # noqa: E402
from harpq.codebooks.quipsharp import E8PCodebook  # noqa: E402
from harpq.kernels.dispatch import kernel_meta, quantized_matmul, scalar_meta  # noqa: E402
from harpq.pipeline.linear import quantize_linear  # noqa: E402
from harpq.rounding import nearest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def quantized(codebook, m, n, seed=0):
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(seed)) * 0.02
    state = codebook.prepare(w)
    codes, _ = nearest(w, codebook, state)
    return {k: v.to(DEVICE) for k, v in codebook.encode(codes, state).items()}


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("rule,group", [("minmax", 64), ("minmax", 0), ("hqq", 32), ("rms", 0)])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_scalar_gemv_matches_decode_then_matmul(bits, rule, group, batch):
    m, n = 40, 200  # neither a multiple of the row block nor of 32 codes: every mask path runs
    cb = ScalarGrid(bits, group, ragged_groups=True, scale=rule)
    buffers = quantized(cb, m, n, seed=bits)
    x = torch.randn(batch, n, generator=torch.Generator().manual_seed(batch)).to(DEVICE)
    ref = x @ cb.decode(buffers, m, n).T
    got = quantized_matmul(cb, buffers, scalar_meta(cb, buffers, m, n), x, m, n)
    assert got.shape == (batch, m) and got.dtype == x.dtype
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("rule,group", [("minmax", 128), ("hqq", 64), ("minmax", 32)])
@pytest.mark.parametrize("batch", [1, 3])
def test_whole_word_gemv_matches_decode_then_matmul(bits, rule, group, batch):
    from harpq.kernels.scalar_gemv import grouped_ok

    m, n = 40, 384  # whole groups of whole words: the fast kernel; 40 rows: a partial row block
    assert grouped_ok(bits, group, n)
    cb = ScalarGrid(bits, group, scale=rule)
    buffers = quantized(cb, m, n, seed=bits + group)
    x = torch.randn(batch, n, generator=torch.Generator().manual_seed(7 * batch)).to(DEVICE)
    ref = x @ cb.decode(buffers, m, n).T
    got = quantized_matmul(cb, buffers, scalar_meta(cb, buffers, m, n), x, m, n)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("batch", [1, 5])
def test_e8p_gemv_matches_decode_then_matmul(bits, batch):
    m, n = 36, 136
    cb = E8PCodebook(bits)
    buffers = quantized(cb, m, n, seed=bits)
    x = torch.randn(batch, n, generator=torch.Generator().manual_seed(batch)).to(DEVICE)
    ref = x @ cb.decode(buffers, m, n).T
    got = quantized_matmul(cb, buffers, kernel_meta(cb, buffers, m, n), x, m, n)
    assert got.shape == (batch, m)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_e8p_gemv_ragged_tiles(bits):
    from harpq.kernels.e8p_gemv import _launch

    m, n = 20, 264  # ragged in both tiles
    cb = E8PCodebook(bits)
    buffers = quantized(cb, m, n, seed=10 + bits)
    x = torch.randn(2, n, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    ref = x @ cb.decode(buffers, m, n).T
    stage2 = {2: 0, 3: 1, 4: 2}[bits]
    got = _launch(x, buffers["codes"], buffers.get("codes2"), stage2, buffers["scales"],
                  1.0 / cb.resid if cb.resid else 0.0, {"BLOCK_M": 8, "BLOCK_C": 16, "num_warps": 4})
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("method,bits,group", [("gptq", 3, 64), ("quipsharp", 2, 0), ("hqq", 4, 64)])
def test_quant_linear_kernel_path_equals_reference_path(method, bits, group):
    torch.manual_seed(0)
    w, h = torch.randn(48, 128) * 0.02, random_hessian(128, tokens=512)
    module, _ = quantize_linear("m", w, h if method != "hqq" else None,
                                harpq.Recipe.preset(method, bits=bits, group_size=group).for_module("m"))
    module = module.to(DEVICE)
    x = torch.randn(2, 3, 128, device=DEVICE)  # 6 rows: the decode kernel
    module.use_kernels = False
    ref = module(x)
    module.use_kernels = True
    got = module(x)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6)
    assert module(torch.randn(17, 128, device=DEVICE)).shape == (17, 48)  # 17 rows: dequantize + matmul


@pytest.mark.parametrize("processor,n", [("rht", 256), ("rht", 344), ("harp", 256), ("harp", 344), ("harp", 512)])
def test_stage_kernels_match_the_sides(processor, n):
    from harpq.kernels.stages import StagePlan, apply_plan
    from harpq.processors import make_processor

    proc = make_processor({"name": processor, "seed": 3, "schedule": "kron"} if processor == "harp"
                          else {"name": processor, "seed": 3})
    buffers = proc.init_buffers(n, n)
    side = proc.side("in", n)
    if processor == "harp":  # learned-looking blocks, not the S = 0 start
        gen = torch.Generator().manual_seed(1)
        buffers.update({k: (torch.randn(v.shape, generator=gen) * 0.3).half() for k, v in buffers.items()
                        if "theta" in k})
    buffers = {k: v.to(DEVICE) for k, v in buffers.items()}
    plan = StagePlan.build(*side.stages(buffers, "v_"))
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(n)).to(DEVICE)
    for transpose, ref in [(False, side.forward(buffers, "v_", x)), (True, side.backward(buffers, "v_", x))]:
        got = apply_plan(plan, x, transpose)
        assert got.dtype == x.dtype
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5), (transpose, (got - ref).abs().max())


@pytest.mark.parametrize("n", [4096, 11008])
def test_harp_transform_takes_the_rht_launch_count(n):
    from harpq.kernels.stages import StagePlan, _launches
    from harpq.processors import make_processor

    counts = {}
    for spec in [{"name": "rht", "seed": 0}, {"name": "harp", "seed": 0, "schedule": "kron"}]:
        proc = make_processor(spec)
        plan = StagePlan.build(*proc.side("in", n).stages(proc.init_buffers(n, n), "v_"))
        stages = [plan.table[i:i + 4] for i in range(0, len(plan.table), 4)]
        counts[spec["name"]] = {len(_launches(stages, t)) for t in (False, True)}
    assert counts["harp"] == counts["rht"] == {2}


@pytest.mark.parametrize("method", ["quipsharp", "harp"])
def test_quant_linear_kernel_path_with_transforms(method):
    torch.manual_seed(0)
    w, h = torch.randn(64, 344) * 0.02, random_hessian(344, tokens=1024)
    recipe = harpq.Recipe.preset(method, harp_steps=3, harp_schedule="kron").for_module("m")
    module, _ = quantize_linear("m", w, h, recipe)
    module = module.to(DEVICE)
    x = torch.randn(2, 344, device=DEVICE)
    module.use_kernels = False
    ref = module(x)
    module.use_kernels = True
    assert torch.allclose(module(x), ref, rtol=1e-4, atol=1e-5)
