"""Block-Hadamard sides fused into the decode step's kernels, against the processor's own sides and the
unfused kernels; and the engine's fused layer against its unfused path."""

import os

import pytest
import torch

from harpq.engine import DecoderShape
from harpq.engine.bench import build
from harpq.engine.decoder import _rope
from harpq.kernels.fused import rms_norm_reference
from harpq.processors.sides import BlockHadamardSide

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="no Triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def side(n: int, block: int, seed: int):
    """A processor side and the kernels' view of it (same signs)."""
    from harpq.kernels.block_sides import BlockSide

    ref = BlockHadamardSide(n, block)
    buffers = {k: v.to(DEV) for k, v in ref.init("s_", torch.Generator().manual_seed(seed)).items()}
    return ref, buffers, BlockSide(buffers["s_signs"], block)


def rand(*shape, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEV)


def close(got, want, tol=2e-3):
    """Equal to fp16 rounding of the output (the two paths round once each, sums in fp32)."""
    assert got.dtype == torch.float16 and got.shape == want.shape
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), err


@pytest.mark.parametrize("n,block,rows", [(512, 128, 3), (384, 128, 1), (96, 32, 2), (4096, 128, 1)])
def test_rotate_is_the_processor_side(n, block, rows):
    from harpq.kernels.block_sides import rotate

    ref, b, s = side(n, block, 1)
    x = rand(rows, n, seed=2).half()
    close(rotate(x, s, input_side=True), ref.forward(b, "s_", x.double()))
    res = rand(rows, n, seed=3).half()
    want = (ref.backward(b, "s_", x.double()).half().double() + res.double())
    close(rotate(x, s, input_side=False, residual=res), want)
    close(rotate(x, s, input_side=False), ref.backward(b, "s_", x.double()))
    wide = rand(rows, 2 * n, seed=4).half()[:, :n]  # rows strided, as a slice of a stacked output
    close(rotate(wide, s, input_side=True), ref.forward(b, "s_", wide.double()))


def test_norm_rotate_is_norm_then_side():
    from harpq.kernels.block_sides import norm_rotate

    ref, b, s = side(384, 128, 5)
    x, w = rand(2, 1, 384, seed=6, scale=30).half(), rand(384, seed=7).half()
    want = ref.forward(b, "s_", rms_norm_reference(x, w, 1e-5).double())
    close(norm_rotate(x, w, 1e-5, s), want)


def test_silu_mul_rotate_is_the_sides_around_silu_mul():
    from harpq.kernels.block_sides import silu_mul_rotate

    (rg, bg, sg), (ru, bu, su), (rd, bd, sd) = side(256, 64, 8), side(256, 64, 9), side(256, 64, 10)
    zg, zu = rand(3, 256, seed=11, scale=3).half(), rand(3, 256, seed=12, scale=3).half()
    g, u = rg.backward(bg, "s_", zg.double()).half(), ru.backward(bu, "s_", zu.double()).half()
    want = rd.forward(bd, "s_", (torch.nn.functional.silu(g.float()).half() * u).double())
    close(silu_mul_rotate(zg, zu, sg, su, sd), want)


@pytest.mark.parametrize("heads,hkv,d,block", [(4, 2, 32, 64), (2, 2, 64, 32), (2, 1, 128, 128)])
def test_rope_rotated_is_sides_then_rope(heads, hkv, d, block):
    from harpq.kernels.block_sides import rope_into_cache_rotated

    b, t, length = 2, 3, 8
    sides = [side(heads * d, block, 13), side(hkv * d, block, 14), side(hkv * d, block, 15)]
    qkv = rand(b, t, (heads + 2 * hkv) * d, seed=16).half()  # one stacked output: strided slices
    q, k, v = qkv.split([heads * d, hkv * d, hkv * d], dim=-1)
    cos, sin = rand(t, d, seed=17), rand(t, d, seed=18)
    pos = torch.tensor([1, 4, 6], device=DEV)
    kc, vc = rand(b, hkv, length, d, seed=19).half(), rand(b, hkv, length, d, seed=20).half()
    kc_ref, vc_ref = kc.clone(), vc.clone()
    got = rope_into_cache_rotated(q, k, v, tuple(s[2] for s in sides), cos, sin, pos, kc, vc)
    uq, uk, uv = (r.backward(bb, "s_", z.float()).half() for (r, bb, _), z in zip(sides, (q, k, v), strict=True))
    close(got, _rope(uq.float().view(b, t, heads, d), cos, sin).transpose(1, 2))
    kc_ref.index_copy_(2, pos, _rope(uk.float().view(b, t, hkv, d), cos, sin).transpose(1, 2).half())
    vc_ref.index_copy_(2, pos, uv.view(b, t, hkv, d).transpose(1, 2))
    close(kc, kc_ref)
    close(vc, vc_ref)


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 4, 128), (2, 2, 256)])
@torch.no_grad()
def test_fused_layer_equals_unfused(heads, kv_heads, dim):
    shape = DecoderShape(dim=dim, layers=2, heads=heads, kv_heads=kv_heads, ffn=384, vocab=64)
    decoder = build(shape, "quipsharp2-block", DEV)
    assert all(blk.fused_sides is not None for blk in decoder.blocks)
    for mod in decoder.modules():
        if hasattr(mod, "use_kernels"):
            mod.use_kernels = True  # the unfused path on the stage kernels too (CPU: interpreted)
    ids, pos = torch.tensor([[1, 2, 3, 5, 7]], device=DEV), torch.arange(5, device=DEV)
    outs = []
    for fused in (False, True):
        decoder.setup_cache(1, 8)
        cos, sin = decoder.cos[pos], decoder.sin[pos]
        masks = {None: (decoder.positions[None, :] <= pos[:, None])[None, None]}
        x = decoder.embed[ids]
        for blk in decoder.blocks:
            x = blk(x, pos, cos, sin, masks, fused)
        outs.append((x, [blk.k_cache.clone() for blk in decoder.blocks]))
    close(outs[1][0], outs[0][0].double())
    for got, want in zip(outs[1][1], outs[0][1], strict=True):
        close(got, want.double())


def test_layers_that_cannot_fuse_run_unfused():
    shape = DecoderShape(dim=128, layers=1, heads=4, kv_heads=2, ffn=344, vocab=64)  # MLP blocks of 8
    assert build(shape, "quipsharp2-block", "cpu").blocks[0].fused_sides is None
    assert build(DecoderShape(128, 1, 4, 4, 384, 64), "quipsharp2", "cpu").blocks[0].fused_sides is None  # full RHT


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_fused_layers_in_a_cuda_graph_equal_eager():
    from harpq.engine import DecodeRunner

    decoder = build(DecoderShape(256, 2, 2, 2, 384, 64), "quipsharp2-block", "cuda")
    ids = torch.randint(0, 64, (2, 4), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    eager = DecodeRunner(decoder, 2, 32, graph=False).generate(ids, 8)
    assert torch.equal(DecodeRunner(decoder, 2, 32, graph=True).generate(ids, 8), eager)


KERNEL_SIGNATURES = {  # argument types of each kernel, and the compile-time values it is built with
    "_rope_cache_rotated": (["*fp16"] * 3 + ["i32"] * 3 + ["*fp16"] * 3 + ["*fp32"] * 3 + ["*i64"] + ["*fp16"] * 3
                            + ["i32"] * 4, [{"D": 32, "U": 128}, {"D": 128, "U": 128}]),
    "_norm_rotate": (["*fp16"] * 5 + ["i32", "fp32", "fp32"], [{"NP": 4096, "B": 128, "R": 16}]),
    "_rotate": (["*fp16", "i32"] + ["*fp16"] * 4 + ["i32", "fp32"],
                [{"B": 128, "R": 16, "SIGNS_FIRST": f, "RESIDUAL": not f} for f in (True, False)]),
    "_silu_mul_rotate": (["*fp16"] * 2 + ["i32"] * 2 + ["*fp16"] * 5 + ["i32", "fp32"], [{"B": 128, "R": 16}]),
}


COMPILE = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import harpq.kernels.block_sides as bs
name, types, variants = json.loads(sys.argv[1])
fn = getattr(bs, name)
for consts in variants:
    sig = dict(zip(fn.arg_names, types)) | {k: "constexpr" for k in consts}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
"""


@pytest.mark.parametrize("name", sorted(KERNEL_SIGNATURES))
def test_kernels_compile_for_sm90(name):
    """The interpreter runs the kernels above without compiling them: compile each for sm_90 (no GPU needed;
    outside the interpreter, so in a process of its own), so that what only a GPU would reject fails here."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = json.dumps([name, *KERNEL_SIGNATURES[name]])
    done = subprocess.run([sys.executable, "-c", COMPILE, args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
