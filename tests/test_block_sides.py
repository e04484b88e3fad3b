"""Block-Hadamard sides fused into the decode step's kernels, against the processor's own sides and the
unfused kernels; and the engine's fused layer against its unfused path."""

import math
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


def side(n: int, block: int | None, seed: int, output: bool = False):
    """A processor side (a block Hadamard of `block`, or with None the full RHT of n) and the kernels' view
    of it in the direction it is applied (output sides: Qᵀ, signs last)."""
    from harpq.hadamard import split_order
    from harpq.kernels.block_sides import BlockSide
    from harpq.processors.sides import HadamardSide

    ref = BlockHadamardSide(n, block) if block else HadamardSide(n, split_order(n)[0])
    buffers = {k: v.to(DEV) for k, v in ref.init("s_", torch.Generator().manual_seed(seed)).items()}
    kernel = BlockSide.build(buffers["s_signs"], *ref.kernel_form(transpose=output))
    assert kernel is not None
    return ref, buffers, kernel


def learned_side(n: int, seed: int, output: bool = False):
    """A HARP side of the `block` schedule with random learned stages (not the S = 0 start), and the kernels'
    view of it in the direction it is applied."""
    from harpq.kernels.block_sides import BlockSide
    from harpq.processors.harp import butterfly_side

    ref = butterfly_side(n, "block")
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(ref.param_shape(t), generator=gen) * 0.3 for t in ref.learned]
    buffers = {k: v.to(DEV) for k, v in {**ref.init("s_", gen), **ref.store_params("s_", params)}.items()}
    stages = ref.run_stages(buffers, "s_", output)
    kernel = BlockSide.build(buffers["s_signs"], *ref.kernel_form(transpose=output), stages)
    assert kernel is not None and kernel.learned
    return ref, buffers, kernel


def rand(*shape, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEV)


def close(got, want, tol=2e-3):
    """Equal to fp16 rounding of the output (the two paths round once each, sums in fp32)."""
    assert got.dtype == torch.float16 and got.shape == want.shape
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), err


@pytest.mark.parametrize("n,k", [(4096, 1), (11008, 172), (768, 12), (28672, 28), (256, 1)])
@pytest.mark.parametrize("transpose", [False, True])
def test_kernel_form_is_the_side(n, k, transpose):
    """(A ⊗ H_b)·diag(s) rebuilt from `kernel_form` equals the RHT side (Qᵀ: its backward) in float64."""
    from harpq.hadamard.construct import sylvester
    from harpq.processors.sides import HadamardSide

    ref = HadamardSide(n, k)
    b = ref.init("s_", torch.Generator().manual_seed(0))
    s = b["s_signs"].double()
    block, outer = ref.kernel_form(transpose)
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = x.reshape(3, n // block, block) @ torch.from_numpy(sylvester(block)).double()
    if outer is not None:
        y = torch.einsum("rs,bsc->brc", outer, y)
    y = y.reshape(3, n) / math.sqrt(n)
    want = ref.backward(b, "s_", x) / s if transpose else ref.forward(b, "s_", x / s)
    assert (y - want).abs().max() < 1e-12


SIDES = [(512, 128, 3), (384, 128, 1), (96, 32, 2), (4096, 128, 1),  # blocks (H_b as radix 8, 8, 2 / 8, 4 factors)
         (48, 16, 1), (768, 256, 2),  # H_16 = H_8 ⊗ H_2, H_256 = H_8 ⊗ H_8 ⊗ H_4
         (4096, None, 2), (768, None, 1), (256, None, 3),  # the full RHT: H_32 ⊗ H_128, H_12 ⊗ H_64, H_2 ⊗ H_128
         (11008, None, 2)]  # H_172 ⊗ H_64: 172 runs, a program writes 16 of them


@pytest.mark.parametrize("n,block,rows", SIDES)
def test_rotate_is_the_processor_side(n, block, rows):
    from harpq.kernels.block_sides import rotate

    ref, b, s = side(n, block, 1)
    _, _, s_out = side(n, block, 1, output=True)
    x = rand(rows, n, seed=2).half()
    close(rotate(x, s, input_side=True), ref.forward(b, "s_", x.double()))
    res = rand(rows, n, seed=3).half()
    want = (ref.backward(b, "s_", x.double()).half().double() + res.double())
    close(rotate(x, s_out, input_side=False, residual=res), want)
    close(rotate(x, s_out, input_side=False), ref.backward(b, "s_", x.double()))
    wide = rand(rows, 2 * n, seed=4).half()[:, :n]  # rows strided, as a slice of a stacked output
    close(rotate(wide, s, input_side=True), ref.forward(b, "s_", wide.double()))


@pytest.mark.parametrize("n,block", [(384, 128), (512, None), (4096, None), (11008, None)])
def test_norm_rotate_is_norm_then_side(n, block):
    from harpq.kernels.block_sides import norm_rotate

    ref, b, s = side(n, block, 5)
    x, w = rand(2, 1, n, seed=6, scale=30).half(), rand(n, seed=7).half()
    want = ref.forward(b, "s_", rms_norm_reference(x, w, 1e-5).double())
    close(norm_rotate(x, w, 1e-5, s), want)


@pytest.mark.parametrize("n,block,how", [(256, 64, "all"), (768, None, "all"), (11008, None, "outputs")])
def test_silu_mul_rotate_is_the_sides_around_silu_mul(n, block, how):
    from harpq.kernels.block_sides import mlp_sides_fuse, silu_mul_rotate

    (rg, bg, sg), (ru, bu, su) = side(n, block, 8, output=True), side(n, block, 9, output=True)
    rd, bd, sd = side(n, block, 10)
    assert mlp_sides_fuse(sg, su, sd) == how
    zg, zu = rand(3, n, seed=11, scale=3).half(), rand(3, n, seed=12, scale=3).half()
    g, u = rg.backward(bg, "s_", zg.double()).half(), ru.backward(bu, "s_", zu.double()).half()
    a = torch.nn.functional.silu(g.float()).half() * u
    close(silu_mul_rotate(zg, zu, sg, su, None), a.double())
    if how == "all":
        close(silu_mul_rotate(zg, zu, sg, su, sd), rd.forward(bd, "s_", a.double()))


@pytest.mark.parametrize("heads,hkv,d,block", [(4, 2, 32, 64), (2, 2, 64, 32), (2, 1, 128, 128),
                                               (2, 2, 128, None), (32, 4, 128, None)])  # full RHT: heads as runs
def test_rope_rotated_is_sides_then_rope(heads, hkv, d, block):
    check_rope([side(heads * d, block, 13, True), side(hkv * d, block, 14, True), side(hkv * d, block, 15, True)],
               heads, hkv, d)


def check_rope(sides, heads: int, hkv: int, d: int) -> None:
    """`rope_into_cache_rotated` with q/k/v's output sides (processor side, buffers, kernels' view) against the
    sides applied by the processor, then the rotary embedding and the cache write."""
    from harpq.kernels.block_sides import rope_into_cache_rotated, rope_sides_fuse

    b, t, length = 2, 3, 8
    assert rope_sides_fuse(tuple(s[2] for s in sides), d)
    qkv = rand(b, t, (heads + 2 * hkv) * d, seed=16).half()  # one stacked output: strided slices
    q, k, v = qkv.split([heads * d, hkv * d, hkv * d], dim=-1)
    cos, sin = rand(t, d, seed=17), rand(t, d, seed=18)
    pos = torch.tensor([1, 4, 6], device=DEV)
    kc, vc = rand(b, hkv, length, d, seed=19).half(), rand(b, hkv, length, d, seed=20).half()
    kc_ref, vc_ref = kc.clone(), vc.clone()
    got = rope_into_cache_rotated(q, k, v, tuple(s[2] for s in sides), cos, sin, pos, kc, vc)
    uq, uk, uv = (r.backward(bb, "s_", z.double()).half() for (r, bb, _), z in zip(sides, (q, k, v), strict=True))
    close(got, _rope(uq.float().view(b, t, heads, d), cos, sin).transpose(1, 2))
    kc_ref.index_copy_(2, pos, _rope(uk.float().view(b, t, hkv, d), cos, sin).transpose(1, 2).half())
    vc_ref.index_copy_(2, pos, uv.view(b, t, hkv, d).transpose(1, 2))
    close(kc, kc_ref)
    close(vc, vc_ref)


@pytest.mark.parametrize("n,rows", [(512, 3), (384, 1), (96, 2), (4096, 1), (1376, 2), (11008, 1)])
def test_learned_runs_are_the_harp_side(n, rows):
    """HARP's block schedule in the kernels (runs of 128, or 32 at 96 and 1,376 and 64 at 11,008: radices 8·8·2,
    8·4, 8·8) equals the processor's side, input and output, with and without the residual."""
    from harpq.kernels.block_sides import rotate

    ref, b, s = learned_side(n, 1)
    _, _, s_out = learned_side(n, 1, output=True)
    x = rand(rows, n, seed=2).half()
    close(rotate(x, s, input_side=True), ref.forward(b, "s_", x.double()))
    res = rand(rows, n, seed=3).half()
    close(rotate(x, s_out, input_side=False, residual=res),
          ref.backward(b, "s_", x.double()).half().double() + res.double())
    wide = rand(rows, 2 * n, seed=4).half()[:, :n]
    close(rotate(wide, s_out, input_side=False), ref.backward(b, "s_", wide.double()))


def test_learned_runs_in_the_norm_and_silu_kernels():
    from harpq.kernels.block_sides import mlp_sides_fuse, norm_rotate, silu_mul_rotate

    ref, b, s = learned_side(384, 5)
    x, w = rand(2, 1, 384, seed=6, scale=30).half(), rand(384, seed=7).half()
    close(norm_rotate(x, w, 1e-5, s), ref.forward(b, "s_", rms_norm_reference(x, w, 1e-5).double()))
    (rg, bg, sg), (ru, bu, su), (rd, bd, sd) = learned_side(1376, 8, True), learned_side(1376, 9, True), \
        learned_side(1376, 10)
    assert mlp_sides_fuse(sg, su, sd) == "all"
    zg, zu = rand(3, 1376, seed=11, scale=3).half(), rand(3, 1376, seed=12, scale=3).half()
    g, u = rg.backward(bg, "s_", zg.double()).half(), ru.backward(bu, "s_", zu.double()).half()
    a = torch.nn.functional.silu(g.float()).half() * u
    close(silu_mul_rotate(zg, zu, sg, su, None), a.double())
    close(silu_mul_rotate(zg, zu, sg, su, sd), rd.forward(bd, "s_", a.double()))
    plain = side(1376, 32, 10)[2]
    assert mlp_sides_fuse(sg, su, plain) == "outputs"  # down's runs hold H_32, gate's learned stages: not one form


@pytest.mark.parametrize("heads,hkv,d", [(4, 4, 32), (2, 1, 128), (3, 3, 32), (2, 2, 64)])
def test_rope_rotated_with_learned_runs(heads, hkv, d):
    """Units of max(block, head) entries: four heads per run of 128, a head per run, a head per run of 32 (96
    wide), two heads per run; q, k and v of one block (else the kernel does not take them)."""
    check_rope([learned_side(heads * d, 13, True), learned_side(hkv * d, 14, True), learned_side(hkv * d, 15, True)],
               heads, hkv, d)


def test_rope_takes_full_sides_only_with_heads_as_runs():
    from harpq.kernels.block_sides import rope_sides_fuse

    q, k = side(256, None, 1, True)[2], side(128, None, 2, True)[2]  # blocks of 128, A = H_2 / none
    assert not rope_sides_fuse((q, k, k), 64) and not rope_sides_fuse((q, q, q), 64)
    assert rope_sides_fuse((q, q, q), 128) and not rope_sides_fuse((q, q, None), 128)


LAYERS = {  # what fuses: every side (blocks; full RHT with A), or some (the rest through the modules)
    "blocks, heads in a unit": ("quipsharp2-block", DecoderShape(128, 2, 4, 4, 384, 64)),
    "blocks of a head": ("quipsharp2-block", DecoderShape(256, 2, 2, 2, 384, 64)),
    "blocks; MLP blocks of 8 unfused": ("quipsharp2-block", DecoderShape(128, 2, 4, 4, 344, 64)),
    "full RHT: A = H_2, H_12": ("quipsharp2", DecoderShape(256, 2, 2, 2, 384, 64)),
    "full RHT, GQA, 4 bits": ("quipsharp4", DecoderShape(512, 2, 4, 2, 768, 64)),
    "full RHT, MLP of 76 runs": ("quipsharp2", DecoderShape(256, 1, 2, 2, 1216, 64)),  # H_76 ⊗ H_16: split
    "HARP runs, heads in a unit": ("harp2-block", DecoderShape(128, 2, 4, 4, 384, 64)),
    "HARP runs of a head, MLP runs of 32": ("harp4-block", DecoderShape(256, 1, 2, 2, 352, 64)),
}


@pytest.mark.parametrize("case", sorted(LAYERS))
@torch.no_grad()
def test_fused_layer_equals_unfused(case):
    fmt, shape = LAYERS[case]
    decoder = build(shape, fmt, DEV)
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
    shape = DecoderShape(128, 1, 4, 4, 384, 64)
    harp = build(shape, "harp2", "cpu").blocks[0]
    assert harp.fused_sides is None  # learned sides
    from harpq.nn.shared_input import SharedInput

    assert isinstance(harp.qkv, SharedInput) and isinstance(harp.gate_up, SharedInput)  # one input side per group
    assert build(shape, "rtn4", "cpu").blocks[0].fused_sides is None  # no sides
    decoder = build(shape, "quipsharp2-block", "cpu")
    from harpq.engine.fused_sides import LayerSides

    blk = decoder.blocks[0]
    mods = dict(zip(("q_proj", "k_proj", "v_proj"), blk.qkv.mods, strict=True)) | dict(blk.linears) \
        | dict(zip(("gate_proj", "up_proj"), blk.gate_up.mods, strict=True))
    assert LayerSides.build(mods, 32) is not None
    mods["k_proj"].v_signs = -mods["k_proj"].v_signs  # k's input side no longer q's (it held q's tensor):
    # q/k/v cannot share one rotated input
    assert LayerSides.build(mods, 32) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_fused_layers_in_a_cuda_graph_equal_eager():
    from harpq.engine import DecodeRunner

    decoder = build(DecoderShape(256, 2, 2, 2, 384, 64), "quipsharp2-block", "cuda")
    ids = torch.randint(0, 64, (2, 4), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    eager = DecodeRunner(decoder, 2, 32, graph=False).generate(ids, 8)
    assert torch.equal(DecodeRunner(decoder, 2, 32, graph=True).generate(ids, 8), eager)


NO_STAGES = {"S1": 0, "S2": 0, "S3": 0, "SHARED": False}
STAGED = [{"S1": 8, "S2": 8, "S3": 2, "SHARED": shared} for shared in (True, False)]  # H_128's factors, learned
KERNEL_SIGNATURES = {  # argument types of each kernel, and the compile-time values it is built with
    "_rope_cache_rotated": (["*fp16"] * 3 + ["i32"] * 3 + ["*fp16"] * 3 + ["*fp32"] * 5 + ["*i64"] + ["*fp16"] * 3
                            + ["i32"] * 4, [{"D": d, "U": 128, "B": 128, **st} for d in (32, 128) for st in STAGED]),
    "_rope_cache_mixed": (["*fp16"] * 3 + ["i32"] * 3 + ["*fp16"] * 7 + ["*fp32"] * 2 + ["*i64"] + ["*fp16"] * 3
                          + ["i32"] * 4 + ["fp32"] * 3,
                          [{"D": 128, "RQ": 32, "RKV": 32}, {"D": 128, "RQ": 64, "RKV": 16}]),
    "_norm_rotate": (["*fp16"] * 6 + ["i32"] + ["fp32"] * 3,
                     [{"NP": 4096, "B": 128, "RIN": 32, "ROUT": 32, "MIX": True, **NO_STAGES}]
                     + [{"NP": 16384, "B": 64, "RIN": 256, "ROUT": 16, "MIX": True, **NO_STAGES, "num_warps": 8}]),
    "_norm_rotate#staged": (["*fp16"] * 4 + ["*fp32", "*fp16", "i32"] + ["fp32"] * 3,
                            [{"NP": 4096, "B": 128, "RIN": 1, "ROUT": 1, "MIX": False, **st} for st in STAGED]),
    "_rotate": (["*fp16", "i32"] + ["*fp16"] * 5 + ["i32"] + ["fp32"] * 2,
                [{"B": 128, "RIN": 32, "ROUT": 32, "MIX": True, **NO_STAGES, "SIGNS_FIRST": f, "RESIDUAL": not f}
                 for f in (True, False)]
                + [{"B": b, "RIN": 256, "ROUT": 16, "MIX": True, **NO_STAGES, "SIGNS_FIRST": f, "RESIDUAL": not f,
                    "num_warps": 8} for f in (True, False) for b in (64, 128)]),
    "_rotate#staged": (["*fp16", "i32"] + ["*fp16"] * 2 + ["*fp32"] + ["*fp16"] * 2 + ["i32"] + ["fp32"] * 2,
                       [{"B": 128, "RIN": 1, "ROUT": 1, "MIX": False, **st, "SIGNS_FIRST": f, "RESIDUAL": not f}
                        for f in (True, False) for st in STAGED]),
    "_silu_mul_rotate": (["*fp16"] * 2 + ["i32"] * 2 + ["*fp16"] * 8 + ["i32"] + ["fp32"] * 2,
                         [{"B": 64, "RIN": 64, "ROUT": 64, "MIX": True, **NO_STAGES, "DOWN": True},
                          {"B": 64, "RIN": 256, "ROUT": 16, "MIX": True, **NO_STAGES, "DOWN": False, "num_warps": 8}]),
    "_silu_mul_rotate#staged": (["*fp16"] * 2 + ["i32"] * 2 + ["*fp16"] * 4 + ["*fp32"] * 3 + ["*fp16", "i32"]
                                + ["fp32"] * 2,
                                [{"B": 64, "RIN": 1, "ROUT": 1, "MIX": False, "S1": 8, "S2": 8, "S3": 0,
                                  "SHARED": False, "DOWN": True}]
                                + [{"B": 128, "RIN": 1, "ROUT": 1, "MIX": False, **st, "DOWN": d}
                                   for st in STAGED for d in (True, False)]),
}


COMPILE = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import harpq.kernels.block_sides as bs
name, types, variants = json.loads(sys.argv[1])
fn = getattr(bs, name.partition("#")[0])
for consts in variants:
    options = {"num_warps": consts.pop("num_warps", 4)}
    sig = dict(zip(fn.arg_names, types)) | {k: "constexpr" for k in consts}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                   options=options)
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


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("fmt", ["quipsharp2", "qtip2"])
@torch.no_grad()
def test_stacked_matrices_are_shared_and_follow_the_layer(fmt):
    """q/k/v's and gate/up's codes are views of their one stacked GEMV matrix (E8P rows; trellis tiles,
    row-block-major), and a Module._apply (what .to() and .cuda() run) moves the stacked tensors with the
    layer: after it, the step reads the new ones only."""
    decoder = build(DecoderShape(256, 1, 2, 2, 384, 64), fmt, DEV)  # the fused step's kernels run on DEV
    blk = decoder.blocks[0]
    stacks = (blk.fused_sides.qkv, blk.fused_sides.gate_up)
    for stack in stacks:
        assert all(_storage(m.codes) == _storage(stack.buffers["codes"]) for m in stack.mods)
    ids, pos = torch.tensor([[1, 2, 3]], device=DEV), torch.arange(3, device=DEV)

    def step():
        decoder.setup_cache(1, 4)
        masks = {None: (decoder.positions[None, :] <= pos[:, None])[None, None]}
        return blk(decoder.embed[ids], pos, decoder.cos[pos], decoder.sin[pos], masks, True)

    before = step()
    old = [stack.buffers["codes"] for stack in stacks]
    decoder._apply(lambda t: t.clone())
    for stack, was in zip(stacks, old, strict=True):
        assert _storage(stack.buffers["codes"]) != _storage(was)
        assert all(_storage(m.codes) == _storage(stack.buffers["codes"]) for m in stack.mods)
        was.zero_()  # the old copy is no longer read
    assert torch.equal(step(), before)
