"""The decode engine against Hugging Face: same logits and greedy tokens, fp and quantized; fused
kernels against their PyTorch references; bench models build with valid random codes."""

import os

import pytest
import torch

import harpq
from harpq.engine import SHAPES, DecoderShape, DecodeRunner, from_hf
from harpq.engine.bench import FORMATS, build, step_bytes
from harpq.errors import HarpqError


@pytest.fixture(scope="module")
def tiny_model(tiny_path):
    return harpq.load(tiny_path, dtype=torch.float64).eval()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.double()


@torch.no_grad()
def test_prefill_and_decode_match_hugging_face(tiny_model):
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    decoder = from_hf(tiny_model)
    decoder.setup_cache(2, 16)
    prefill = decoder(ids[:, :6], torch.arange(6))
    assert torch.allclose(prefill, hf_logits(tiny_model, ids[:, :6])[:, -1], atol=1e-9)
    for t in range(6, 9):  # one token at a time against the cache
        step = decoder(ids[:, t:t + 1], torch.tensor([t]))
        assert torch.allclose(step, hf_logits(tiny_model, ids[:, :t + 1])[:, -1], atol=1e-9)


def test_greedy_generation_matches_hugging_face(tiny_model):
    ids = torch.randint(0, tiny_model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))
    ref = tiny_model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[:, 5:]
    runner = DecodeRunner(from_hf(tiny_model), 1, 32)
    assert runner.graph is None and not runner.use_graph  # CPU: eager steps
    assert torch.equal(runner.generate(ids, 12), ref)


def test_quantized_model_runs_in_the_engine(tiny_gptq):
    model = harpq.load(tiny_gptq).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(2))
    decoder = from_hf(model)
    decoder.setup_cache(1, 8)
    qkv = decoder.blocks[0].qkv  # processor-free quantized linears are stacked like fp16 ones
    attn = model.model.layers[0].self_attn
    assert qkv.out_features == sum(getattr(attn, n).out_features for n in ("q_proj", "k_proj", "v_proj"))
    assert attn.k_proj.codes.data_ptr() == qkv.codes[attn.q_proj.out_features:].data_ptr()  # views, no copy
    with torch.no_grad():
        assert torch.allclose(decoder(ids, torch.arange(7)), model(ids).logits[:, -1], atol=1e-4)


def test_runner_rejects_what_does_not_fit(tiny_model):
    runner = DecodeRunner(from_hf(tiny_model), 1, 8)
    with pytest.raises(HarpqError, match="does not fit"):
        runner.prefill(torch.zeros(1, 8, dtype=torch.long))
    runner.prefill(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(HarpqError, match="do not fit"):
        runner.decode(4)


def test_decoder_needs_a_cache(tiny_model):
    with pytest.raises(HarpqError, match="setup_cache"):
        from_hf(tiny_model)(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_bench_models_are_valid(fmt):
    ffn = 352 if "qtip" in fmt else 344  # the trellis codes 16 × 16 tiles
    shape = DecoderShape(dim=128, layers=1, heads=4, kv_heads=2, ffn=ffn, vocab=64)
    decoder = build(shape, fmt, "cpu")
    decoder.setup_cache(1, 4)
    with torch.no_grad():
        logits = decoder(torch.tensor([[1, 2]]), torch.arange(2))
    assert logits.shape == (1, 64) and torch.isfinite(logits).all()
    nbytes = step_bytes(decoder)
    fp16 = 2 * sum(o * i for o, i in shape.linear_shapes().values())
    assert nbytes["linears"] > 0 and (nbytes["linears"] == fp16) == (fmt == "fp16")


def test_step_bytes_count_the_learned_runs_once_per_side():
    """A fused HARP layer's kernels read each side's learned blocks (float32, n·Σ radices entries): every output side,
    and the input sides of q/k/v (shared), o, gate/up (shared) and down."""
    from harpq.engine.bench import learned_side_bytes
    from harpq.processors.butterfly import greedy_schedule
    from harpq.processors.sides import block_size

    shape = DecoderShape(dim=128, layers=1, heads=4, kv_heads=2, ffn=384, vocab=64)
    blk = build(shape, "harp2-block", "cpu").blocks[0]
    assert blk.fused_sides is not None

    def floats(n):
        return n * sum(greedy_schedule(block_size(n, 128)))

    dims = shape.linear_shapes()
    want = sum(floats(o) for o, _ in dims.values()) + sum(floats(dims[n][1]) for n in
                                                          ("q_proj", "o_proj", "gate_proj", "down_proj"))
    assert learned_side_bytes(blk) == 4 * want
    assert learned_side_bytes(build(shape, "quipsharp2-block", "cpu").blocks[0]) == 0


def test_bench_refuses_a_shape_its_format_cannot_store():
    with pytest.raises(HarpqError, match=r"model.layers.0.gate_proj is 344×128: qtip codes 16×16 tiles"):
        build(DecoderShape(dim=128, layers=1, heads=4, kv_heads=2, ffn=344, vocab=64), "qtip2", "cpu")


def test_shapes_are_the_published_ones():
    s = SHAPES["llama-2-7b"]
    params = s.layers * sum(o * i for o, i in s.linear_shapes().values())
    assert abs(params - 6.48e9) < 0.01e9  # 7B minus embeddings and head
    assert SHAPES["llama-2-70b"].linear_shapes()["k_proj"] == (1024, 8192)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(), reason="no Triton")
def test_fused_kernels_match_references():
    from harpq.engine.decoder import _rope
    from harpq.kernels.fused import rms_norm, rope_into_cache, silu_mul

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dev)

    x, w = rand(3, 200), rand(200)
    assert torch.allclose(rms_norm(x, w, 1e-5, True), rms_norm(x, w, 1e-5, False), atol=1e-5)
    g, u = rand(5, 300), rand(5, 300)
    assert torch.allclose(silu_mul(g, u, True), silu_mul(g, u, False), atol=1e-5)
    b, t, heads, hkv, d, length = 2, 3, 4, 2, 16, 8
    qkv = rand(b, t, (heads + 2 * hkv) * d)  # one fused projection: q, k, v are strided column slices
    q, k, v = qkv.split([heads * d, hkv * d, hkv * d], dim=-1)
    cos, sin = rand(t, d), rand(t, d)
    pos = torch.tensor([1, 4, 6], device=dev)
    kc, vc = rand(b, hkv, length, d), rand(b, hkv, length, d)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    got = rope_into_cache(q, k, v, cos, sin, pos, kc, vc)
    assert torch.allclose(got, _rope(q.view(b, t, heads, d), cos, sin).transpose(1, 2), atol=1e-5)
    kc_ref.index_copy_(2, pos, _rope(k.reshape(b, t, hkv, d), cos, sin).transpose(1, 2))
    vc_ref.index_copy_(2, pos, v.reshape(b, t, hkv, d).transpose(1, 2))
    assert torch.allclose(kc, kc_ref, atol=1e-5) and torch.equal(vc, vc_ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("method", ["fp16", "quipsharp", "harp"])
def test_cuda_graph_decode_equals_eager(tiny_path, method):
    model = harpq.load(tiny_path, device="cuda").eval()
    if method != "fp16":
        from harpq.engine.bench import random_quant_linear

        gen = torch.Generator(device="cuda").manual_seed(0)
        for i, layer in enumerate(model.model.layers):
            for parent in (layer.self_attn, layer.mlp):
                for name, mod in list(parent.named_children()):
                    if isinstance(mod, torch.nn.Linear):
                        q = random_quant_linear(method, {"bits": 2}, mod.out_features, mod.in_features,
                                                f"{i}.{name}", torch.device("cuda"), gen)
                        setattr(parent, name, q)
    ids = torch.randint(0, model.config.vocab_size, (2, 6), device="cuda", generator=torch.Generator(
        device="cuda").manual_seed(4))
    eager = DecodeRunner(from_hf(model), 2, 32, graph=False).generate(ids, 16)
    graphed = DecodeRunner(from_hf(model), 2, 32, graph=True)
    assert torch.equal(graphed.generate(ids, 16), eager)
    assert graphed.graph is not None


@pytest.mark.parametrize("method,bits", [("rtn", 4), ("quipsharp", 2)])
def test_gate_up_glu_takes_its_input_norm(method, bits):
    """Where no kernel folds them (here: the CPU), QuantLinear.glu(x, norm=(w, eps)) of a stacked [gate; up] is
    silu(gate) · up of QuantLinear(RMSNorm(x)), with or without an input transform."""
    from harpq.engine.bench import random_quant_linear
    from harpq.kernels.fused import rms_norm_reference

    gen = torch.Generator().manual_seed(bits)
    module = random_quant_linear(method, {"bits": bits}, 64, 256, "model.layers.0.mlp.gate_proj",
                                 torch.device("cpu"), gen)
    x, weight = torch.randn(3, 2, 256, generator=gen), torch.rand(256, generator=gen) + 0.5
    got = module.glu(x, norm=(weight, 1e-5))
    z = module(rms_norm_reference(x, weight, 1e-5))
    assert got.shape == (3, 2, 32)
    assert torch.equal(got, torch.nn.functional.silu(z[..., :32]) * z[..., 32:])
    assert torch.equal(module.glu(x), torch.nn.functional.silu(module(x)[..., :32]) * module(x)[..., 32:])


def test_a_folded_norm_refuses_a_weight_it_cannot_take():
    from harpq.kernels.nvrtc import norm_arg

    with pytest.raises(ValueError, match="at most 4 rows and 20480 values with its weight, got 5 rows of 256"):
        norm_arg(torch.ones(256).half(), 5, 256, 4)
    with pytest.raises(ValueError, match=r"norm weight of shape \(256,\) torch.float32, expected \(256,\) fp16"):
        norm_arg(torch.ones(256), 1, 256, 4)
    with pytest.raises(ValueError, match=r"shape \(128,\)"):
        norm_arg(torch.ones(128).half(), 1, 256, 4)
    with pytest.raises(ValueError, match="got 2 rows of 8192"):  # 48 KB: more shared memory than a block has
        norm_arg(torch.ones(8192).half(), 2, 8192, 4)
    assert norm_arg(torch.ones(256).half(), 4, 256, 4).shape == (256,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the folded norm runs in the CUDA kernels")
@pytest.mark.parametrize("fmt", ["rtn4", "hqq4", "rtn2"])
@pytest.mark.parametrize("batch", [1, 2, 6])
def test_decode_with_the_mlp_norm_and_silu_folded_equals_without(fmt, batch, monkeypatch):
    """The step that folds the MLP's RMSNorm (batch ≤ 2) and SiLU·up into the gate/up GEMV gives the logits of
    the step that runs them as kernels of their own (fp16 rounding apart)."""
    from harpq.engine import decoder as decoder_module
    from harpq.engine.bench import build

    dec = build(DecoderShape(512, 2, 4, 2, 2304, 1000), fmt, "cuda", seed=batch)
    gen = torch.Generator(device="cuda").manual_seed(1)
    for blk in dec.blocks:  # norms that are not all ones
        blk.attn_norm.copy_(torch.rand(512, device="cuda", generator=gen) + 0.5)
        blk.mlp_norm.copy_(torch.rand(512, device="cuda", generator=gen) + 0.5)
    x0 = torch.zeros(batch, 512, device="cuda").half()
    gate_up = dec.blocks[0].gate_up
    backend = harpq.kernels.select(gate_up.format, x0, gate_up.out_features, gate_up.in_features)
    assert backend.folds_norm(x0) == (batch <= 2)
    assert backend.folds_glu(x0, gate_up.out_features)
    ids = torch.randint(0, 1000, (batch, 6), device="cuda", generator=gen)
    logits = {}
    for fold in (True, False):
        monkeypatch.setattr(decoder_module, "FOLD", fold)
        dec.setup_cache(batch, 16)
        with torch.no_grad():
            dec(ids[:, :5], torch.arange(5, device="cuda"))
            logits[fold] = dec(ids[:, 5:], torch.tensor([5], device="cuda")).double()
    assert torch.isfinite(logits[False]).all()
    assert (logits[True] - logits[False]).norm() / logits[False].norm() < 5e-3


@torch.no_grad()
def test_fused_projections_share_memory_with_the_model(tiny_path):
    model = harpq.load(tiny_path).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(5))
    before = model(ids).logits
    decoder = from_hf(model)
    attn = model.model.layers[0].self_attn
    fused = decoder.blocks[0].qkv.weight
    assert attn.k_proj.weight.data_ptr() == fused[attn.q_proj.out_features:].data_ptr()
    assert torch.equal(model(ids).logits, before)  # the HF model still computes the same function


def test_api_generate_engine_path_equals_hugging_face(tiny_path):
    from harpq.io.model import load_tokenizer

    model, tok = harpq.load(tiny_path).eval(), load_tokenizer(tiny_path)
    hf = harpq.generate(model, "Once upon a time", max_new_tokens=20, tokenizer=tok, engine=False)
    ours = harpq.generate(model, "Once upon a time", max_new_tokens=20, tokenizer=tok, engine=True)
    assert ours == hf and len(hf) > 0


@pytest.mark.parametrize("method,stackable", [("gptq", True), ("hqq", True), ("quip", False), ("quipsharp", False)])
def test_quant_linears_stack_exactly_where_their_format_allows(method, stackable):
    from helpers import random_hessian

    from harpq.nn import QuantLinear
    from harpq.pipeline.linear import quantize_linear

    torch.manual_seed(0)
    n, h = 256, random_hessian(256, tokens=1024)
    recipe = harpq.Recipe.preset(method, bits=3).for_module("m")
    mods = [quantize_linear("m", torch.randn(rows, n) * 0.02, h, recipe)[0] for rows in (64, 32, 48)]
    x = torch.randn(5, n)
    with torch.no_grad():
        want = torch.cat([m(x) for m in mods], dim=-1)
        fused = QuantLinear.stack(mods)
        assert (fused is not None) == stackable
        if stackable:
            assert torch.equal(fused(x), want)
            assert torch.equal(torch.cat([m(x) for m in mods], dim=-1), want)  # originals still exact


def _group(method: str, input_seeds: tuple[int, ...], n: int = 256):
    from dataclasses import replace

    from helpers import random_hessian

    from harpq.pipeline.linear import quantize_linear

    torch.manual_seed(0)
    h = random_hessian(n, tokens=1024)
    mods = []
    for i, (rows, seed) in enumerate(zip((64, 32, 48), input_seeds, strict=True)):
        recipe = replace(harpq.Recipe.preset(method, bits=2).for_module(f"m{i}"), input_seed=seed)
        mods.append(quantize_linear(f"m{i}", torch.randn(rows, n) * 0.02, h, recipe)[0])
    return mods


@pytest.mark.parametrize("method", ["quipsharp", "quip"])
def test_linears_with_one_input_side_apply_it_once(method, monkeypatch):
    from harpq.nn import QuantLinear, SharedInput

    mods = _group(method, (7, 7, 7))
    group = SharedInput.build(mods)
    assert group is not None
    for m in mods:
        m.use_kernels = True  # the per-call path (on the CPU: the PyTorch reference), not the dense copies
    calls = []
    real = QuantLinear.rotate_input
    monkeypatch.setattr(QuantLinear, "rotate_input", lambda self, rows, context=None:
                        calls.append(self) or real(self, rows, context))
    x = torch.randn(2, 3, 256)
    with torch.no_grad():
        got = group(x)
        assert len(calls) == 1
        want = [m(x) for m in mods]
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert [g.shape for g in got] == [(2, 3, 64), (2, 3, 32), (2, 3, 48)]


@pytest.mark.parametrize("method,seeds", [("quipsharp", (7, 7, 8)), ("gptq", (7, 7, 7))])
def test_no_shared_input_where_the_input_sides_differ_or_there_are_none(method, seeds):
    from harpq.nn import SharedInput

    assert SharedInput.build(_group(method, seeds)) is None


@torch.no_grad()
@pytest.mark.parametrize("fmt", ["quipsharp2", "harp2"])
def test_engine_shares_the_input_transform_of_q_k_v_and_gate_up(fmt):
    """bench models draw q/k/v's and gate/up's input sides once per group, as the pipeline does (HARP's learned
    ones too: it fits them jointly); the engine then rotates each group's input once, and the step equals
    the one through dense weights."""
    from harpq.nn import QuantLinear, SharedInput

    shape = DecoderShape(dim=128, layers=1, heads=4, kv_heads=2, ffn=256, vocab=64)
    decoder = build(shape, fmt, "cpu")
    blk = decoder.blocks[0]
    assert isinstance(blk.qkv, SharedInput) and isinstance(blk.gate_up, SharedInput)
    assert len(blk.qkv.mods) == 3 and len(blk.gate_up.mods) == 2
    ids = torch.tensor([[1, 2, 3]])
    decoder.setup_cache(1, 4)
    dense = decoder(ids, torch.arange(3)).double()
    for m in decoder.modules():
        if isinstance(m, QuantLinear):
            m.use_kernels = True
    decoder.setup_cache(1, 4)
    shared = decoder(ids, torch.arange(3)).double()
    assert torch.allclose(shared, dense, rtol=1e-3, atol=1e-3 * dense.abs().max())
