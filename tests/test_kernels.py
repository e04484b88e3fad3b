"""Triton transform kernels against the processors' sides: CPU via the interpreter, or CUDA."""

import os

import pytest
import torch
from helpers import random_hessian

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and Triton's interpreter is off", allow_module_level=True)

import harpq  # noqa: E402
from harpq.pipeline.linear import quantize_linear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("processor,n", [("rht", 256), ("rht", 344), ("rht-block", 512), ("rht-block", 1376),
                                         ("harp", 256), ("harp", 344), ("harp", 512)])
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


def test_plans_know_when_they_are_a_sylvester_hadamard():
    """Only the RHT at a power-of-two width (signs, then Sylvester stages) may take the one-launch kernel."""
    from harpq.processors import make_processor

    def sylvester(config, m, n):
        p = make_processor(config)
        return [plan.sylvester for plan in p.stage_plans(p.init_buffers(m, n), m, n)]

    assert sylvester({"name": "rht", "seed": 1}, 4096, 4096) == [True, True]
    assert sylvester({"name": "rht", "seed": 1}, 11008, 4096) == [False, True]  # H_172 ⊗ H_64 outputs
    assert sylvester({"name": "harp", "seed": 1, "schedule": "kron"}, 4096, 4096) == [False, False]
    assert sylvester({"name": "rht-block", "seed": 1}, 4096, 4096) == [False, False]  # blocks of 128 only
