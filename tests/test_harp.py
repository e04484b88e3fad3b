import json
import math

import pytest
import torch
from conftest import CALIB
from helpers import random_hessian
from safetensors.torch import load_file, save_file
from test_processors import ProcessedLinear

import harpq
from harpq import HarpqError
from harpq.codebooks.quipsharp import E8PCodebook
from harpq.hadamard.construct import sylvester
from harpq.io.model import find_decoder_layers, layer_linears, load_model
from harpq.nn import QuantLinear
from harpq.pipeline.linear import quantize_linear
from harpq.processors import make_processor
from harpq.processors.butterfly import cayley, check_schedule, greedy_schedule, skew_from_upper
from harpq.processors.harp import butterfly_side
from harpq.processors.sides import hadamard_or_fft

SIZES = [128, 344, 512, 1376, 4096, 11008, 14336]


def random_params(side, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(side.param_shape(t), generator=g, dtype=torch.float64) * scale for t in side.learned]


def test_cayley_blocks_are_orthogonal_and_identity_at_zero():
    s = skew_from_upper(torch.randn(5, 28, dtype=torch.float64) * 2, 8)
    assert torch.equal(s, -s.transpose(1, 2))
    q = cayley(s)
    eye = torch.eye(8, dtype=torch.float64)
    assert (q @ q.transpose(1, 2) - eye).abs().max() < 1e-13
    assert torch.equal(cayley(torch.zeros(3, 8, 8, dtype=torch.float64)), eye.expand(3, 8, 8))


@pytest.mark.parametrize("n", [2, 7, 8, 43, 128, 344, 1376, 3072, 5120, 11008, 14336, 28672, 2 * 4099])
def test_schedule_products_equal_n(n):
    schedule = greedy_schedule(n)
    assert math.prod(schedule) == n
    assert all(b <= 8 for b in schedule[:-1])


def test_greedy_schedules_of_llama_sizes():
    assert greedy_schedule(4096) == [8, 8, 8, 8]
    assert greedy_schedule(11008) == [8, 8, 4, 43]
    assert greedy_schedule(14336) == [8, 8, 8, 7, 4]
    assert greedy_schedule(28672) == [8, 8, 8, 8, 7]
    with pytest.raises(HarpqError, match="does not factor 96"):
        check_schedule(96, [8, 8])


@pytest.mark.parametrize("n", [128, 512, 4096])
def test_greedy_at_zero_is_the_normalised_sylvester_hadamard(n):
    side = butterfly_side(n, "greedy")
    ks = side.kernels(random_params(side, scale=0.0), torch.device("cpu"), torch.float64)
    q = side.apply(torch.eye(n, dtype=torch.float64), ks, torch.ones(n)).T
    assert (q - torch.from_numpy(sylvester(n)).double() / math.sqrt(n)).abs().max() < 1e-14


@pytest.mark.parametrize("n", SIZES)
def test_kron_schedule_at_zero_is_the_rht(n):
    harp = make_processor({"name": "harp", "seed": 4, "input_seed": 9, "schedule": "kron"})
    rht = make_processor({"name": "rht", "seed": 4, "input_seed": 9})
    hb, rb = harp.init_buffers(8, n), rht.init_buffers(8, n)
    assert hadamard_or_fft(n).kind == "hadamard"
    x = torch.randn(3, n, dtype=torch.float64)
    assert (harp.apply_input(hb, x) - rht.apply_input(rb, x)).abs().max() < 1e-12


@pytest.mark.parametrize("n", [128, 344, 512, 1376, 4096, 192])  # runs of 128, 8, 128, 32, 128, 64 (as 11008's)
def test_block_schedule_at_zero_is_rht_block_and_stays_inside_its_runs(n):
    harp = make_processor({"name": "harp", "seed": 4, "input_seed": 9, "schedule": "block"})
    block = make_processor({"name": "rht-block", "seed": 4, "input_seed": 9})
    hb, bb = harp.init_buffers(8, n), block.init_buffers(8, n)
    x = torch.randn(3, n, dtype=torch.float64)
    assert (harp.apply_input(hb, x) - block.apply_input(bb, x)).abs().max() < 1e-12
    side = harp.side("in", n)
    b = side.block
    assert b == block.side("in", n).block and n % b == 0 and math.prod(side.schedule) == b
    learned = {**hb, **side.store_params("v_", random_params(side, seed=3))}
    q = harp.apply_input(learned, torch.eye(n, dtype=torch.float64))  # rows: Q e_i
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    runs = torch.arange(n) // b
    assert not q[runs[:, None] != runs[None, :]].any()  # nothing crosses a run
    assert not torch.allclose(q, block.apply_input(bb, torch.eye(n, dtype=torch.float64)))


def test_a_butterfly_run_must_divide_the_width():
    from harpq.processors.harp import ButterflySide

    with pytest.raises(HarpqError, match="runs of 128 need a width they divide"):
        ButterflySide(1376, [8, 16], block=128)
    with pytest.raises(HarpqError, match="does not factor 128"):
        ButterflySide(512, [8, 8], block=128)


@pytest.mark.parametrize("schedule", ["greedy", "kron", "block"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("store", ["fp16", "int8"])
def test_function_preserved_in_float64_at_zero_and_with_learned_parameters(schedule, n, store):
    proc = make_processor({"name": "harp", "seed": 1, "input_seed": 2, "schedule": schedule, "store": store})
    m = 24
    start = proc.init_buffers(m, n)
    learned = {**start, **proc.side("out", m).store_params("u_", random_params(proc.side("out", m), seed=1)),
               **proc.side("in", n).store_params("v_", random_params(proc.side("in", n), seed=2))}
    w = torch.randn(m, n, dtype=torch.float64)
    x = torch.randn(5, n, dtype=torch.float64)
    for b in (start, learned):
        y = proc.apply_output(b, proc.apply_input(b, x) @ proc.transform_weight(b, w).T)
        assert float((y - x @ w.T).abs().max() / (x @ w.T).abs().max()) < 1e-10
    assert not torch.allclose(proc.transform_weight(start, w), proc.transform_weight(learned, w))


@pytest.mark.parametrize("schedule", ["greedy", "kron", "block"])
def test_fitted_model_equals_original_in_float64(tiny_path, schedule):
    model = load_model(tiny_path, dtype=torch.float64)
    x = torch.randint(0, 8192, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).logits
    _, layers = find_decoder_layers(model)
    fits = 0
    for i, layer in enumerate(layers):
        for rel, lin in layer_linears(layer).items():
            proc = make_processor({"name": "harp", "seed": i, "schedule": schedule, "steps": 3})
            wrapped = ProcessedLinear(lin, proc)
            m, n = lin.weight.shape
            wrapped.b = proc.fit(wrapped.b, lin.weight.detach(), random_hessian(n, tokens=n), E8PCodebook(2))
            wrapped.w = proc.transform_weight(wrapped.b, lin.weight.detach())
            fits += any(bool(v.any()) for k, v in wrapped.b.items() if "theta" in k)
            parent, _, child = rel.rpartition(".")
            setattr(layer.get_submodule(parent), child, wrapped)
    assert fits > 0  # parameters really moved
    with torch.no_grad():
        got = model(x).logits
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-10


def test_fitting_lowers_its_loss_and_never_ends_above_the_start():
    torch.manual_seed(0)
    w = torch.distributions.StudentT(torch.tensor(4.0)).sample((64, 128))
    h = random_hessian(128, tokens=512)
    recipe = harpq.Recipe.preset("harp", harp_steps=60).for_module("toy")
    _, report = quantize_linear("toy", w, h, recipe)
    fit = report.parts["fit"]
    assert fit["loss_best"] < 0.9 * fit["loss_start"]
    assert report.proxy_loss <= fit["proxy_loss_start"]
    _, start = quantize_linear("toy", w, h, harpq.Recipe.preset("quipsharp").for_module("toy"))
    assert start.proxy_loss == pytest.approx(fit["proxy_loss_start"], rel=1e-5)  # the start is QuIP#'s RHT


@pytest.mark.parametrize("store", ["fp16", "int8"])
def test_parameters_round_trip_through_save_and_load(tmp_path, store):
    torch.manual_seed(0)
    w, h = torch.randn(48, 344), random_hessian(344, tokens=1024)
    recipe = harpq.Recipe.preset("harp", harp_steps=5, harp_store=store).for_module("m")
    module, _ = quantize_linear("m", w, h, recipe)
    save_file(module.state_dict(), tmp_path / "m.safetensors")
    spec = json.loads(json.dumps(module.spec()))
    loaded = QuantLinear.from_spec(spec).load_quantized(load_file(tmp_path / "m.safetensors"))
    thetas = [k for k, _ in module.named_buffers() if "theta" in k]
    assert thetas and any(bool(getattr(module, k).any()) for k in thetas)
    assert all(torch.equal(getattr(module, k), getattr(loaded, k)) for k in thetas)
    x = torch.randn(3, 344)
    assert torch.equal(module(x), loaded(x))
    assert torch.allclose(module.effective_weight(), loaded.effective_weight())


def test_harp_method_end_to_end(tiny_path, tmp_path, small_text):
    out = tmp_path / "harp"
    recipe = harpq.Recipe.preset("harp", harp_steps=4, harp_schedule="kron", harp_store="int8", harp_refresh=1)
    harpq.quantize(tiny_path, out, recipe, calib=CALIB, nsamples=4, seqlen=64, progress=False)
    log = [json.loads(line) for line in (out / "quant_log.jsonl").read_text().splitlines()]
    assert len(log) == 14
    assert all(e["processor"] == "harp" and e["proxy_loss"] <= e["fit"]["proxy_loss_start"] for e in log)
    model = harpq.load(out)
    thetas = [b for k, b in model.named_buffers() if "theta" in k and not k.endswith("_scale")]
    assert thetas and all(b.dtype == torch.int8 for b in thetas) and any(bool(b.any()) for b in thetas)
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert modules["model.layers.1.self_attn.v_proj"]["input_side_from"] == "model.layers.1.self_attn.q_proj"
    assert modules["model.layers.1.mlp.up_proj"]["input_side_from"] == "model.layers.1.mlp.gate_proj"
    # q/k/v and gate/up were fitted with one input side each: the step can apply it once per group
    for layer in model.model.layers:
        q, k, v = (getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj"))
        assert q.shares_input_side(k) and q.shares_input_side(v)
        assert layer.mlp.gate_proj.shares_input_side(layer.mlp.up_proj)
        assert not q.shares_input_side(layer.self_attn.o_proj) or q.in_features != layer.self_attn.o_proj.in_features
    shared = [e for e in log if e["fit"].get("shared_input")]
    assert len(shared) == 10 and sum(e["fit"]["seconds"] > 0 for e in shared) == 4  # each group's fit once
    result = harpq.evaluate(out, ppl=[small_text], ctx=64)
    assert math.isfinite(next(iter(result["ppl"].values())))


def test_bad_harp_settings_fail_before_work(tiny_path, tmp_path):
    with pytest.raises(HarpqError, match="unknown HARP schedule 'zigzag'"):
        harpq.quantize(tiny_path, tmp_path / "x", harpq.Recipe.preset("harp", harp_schedule="zigzag"),
                       calib=CALIB, nsamples=2, seqlen=32, progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("codebook,group", [("scalar", 64), ("hqq", 64), ("scalar", 0)])
def test_harp_under_scalar_and_hqq_codebooks(codebook, group):
    torch.manual_seed(1)
    w = torch.distributions.StudentT(torch.tensor(4.0)).sample((64, 128))
    h = random_hessian(128, tokens=512)
    recipe = harpq.Recipe.preset("gptq", bits=3, group_size=group, processor="harp", codebook=codebook,
                                 harp_steps=40).for_module("toy")
    _, report = quantize_linear("toy", w, h, recipe)
    fit = report.parts["fit"]
    assert fit["loss_best"] < fit["loss_start"] and fit["hbd"] == (group == 64)
    assert report.proxy_loss <= fit["proxy_loss_start"]


def test_a_time_budget_stops_every_fit_early_and_never_worse_than_the_start(tiny_path, tmp_path):
    """--harp-budget: the run's seconds are shared by its HARP linears as they come; each fit stops once its
    share is spent, keeps its best iterate (the start included), and says so in the log."""
    out = tmp_path / "harp"
    recipe = harpq.Recipe.preset("harp", harp_steps=100_000, harp_schedule="kron")
    recipe.harp_budget = 0.7
    harpq.quantize(tiny_path, out, recipe, calib=CALIB, nsamples=4, seqlen=64, progress=False)
    log = [json.loads(line) for line in (out / "quant_log.jsonl").read_text().splitlines()]
    assert len(log) == 14
    fits = [e["fit"] for e in log]
    assert all(f["stopped"] == "time budget" and f["steps"] < 100_000 for f in fits)
    assert all(e["proxy_loss"] <= e["fit"]["proxy_loss_start"] for e in log)
    # first share: q/k/v's joint fit takes three shares of the budget over 14 linears
    assert fits[0]["budget_s"] == pytest.approx(3 * 0.7 / 14, abs=1e-3)
    # a share is what is left over the linears left: the total overshoots by at most one step per linear
    step_time = max(f["seconds"] / max(f["steps"], 1) for f in fits)
    assert sum(f["seconds"] for f in fits) <= 0.7 + 14 * step_time + 0.05


def test_a_zero_budget_keeps_the_start_and_the_budget_is_checked(tmp_path):
    from harpq.codebooks import make_codebook
    from harpq.processors import make_processor
    from harpq.processors.harp_fit import FitSettings, fit_two_sided

    torch.manual_seed(0)
    w, h = torch.randn(64, 128), random_hessian(128, tokens=512)
    proc = make_processor({"name": "harp", "seed": 0, "schedule": "kron"})
    buffers = proc.init_buffers(64, 128)
    _, summary = fit_two_sided(proc.side("out", 64), proc.side("in", 128), buffers, w, h,
                               make_codebook({"name": "e8p", "bits": 2}), FitSettings(steps=50, seconds=0.0))
    assert summary["steps"] == 0 and summary["best_step"] == 0 and summary["stopped"] == "time budget"
    with pytest.raises(HarpqError, match="time budget must be 0 or more"):
        make_processor({"name": "harp", "seed": 0, "seconds": -1})


def test_the_target_is_searched_every_refresh_steps(monkeypatch):
    """--harp-refresh K: the codebook search (most of a step's time) runs at steps 0, K, 2K, ...; the fit
    still keeps its best iterate."""
    from harpq.codebooks import make_codebook
    from harpq.processors import harp_fit, make_processor

    calls = []
    real = harp_fit.nearest
    monkeypatch.setattr(harp_fit, "nearest", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    w, h = torch.randn(64, 128), random_hessian(128, tokens=512)
    proc = make_processor({"name": "harp", "seed": 0, "schedule": "kron", "steps": 10, "refresh": 4})
    assert proc.config()["refresh"] == 4
    buffers = proc.init_buffers(64, 128)
    fitted = proc.fit(buffers, w, h, make_codebook({"name": "e8p", "bits": 2}))
    assert len(calls) == 3 and proc.last_fit["steps"] == 10  # steps 0, 4, 8 (and the step-10 evaluation reuses 8's)
    assert proc.last_fit["loss_best"] <= proc.last_fit["loss_start"]
    assert set(fitted) == set(buffers)
    with pytest.raises(HarpqError, match="refresh interval"):
        make_processor({"name": "harp", "seed": 0, "refresh": 0})


def test_a_shared_input_side_is_fitted_jointly_and_preserves_function(tiny_path):
    """One input side for linears that read one input: the joint fit moves it (and each output side), all
    members store the same input side, each stays function-preserving in float64, and the fit refuses
    linears whose input widths or signs differ."""
    from harpq.codebooks import make_codebook
    from harpq.processors import make_processor

    torch.manual_seed(0)
    n = 128
    h = random_hessian(n, tokens=512)
    ws = [torch.randn(rows, n) * 0.02 for rows in (64, 32, 32)]
    procs = [make_processor({"name": "harp", "seed": i, "input_seed": 7, "schedule": "kron", "steps": 20})
             for i in range(3)]
    starts = [p.init_buffers(w.shape[0], n) for p, w in zip(procs, ws, strict=True)]
    fitted = procs[0].fit_shared_input(starts, ws, h, make_codebook({"name": "e8p", "bits": 2}))
    assert procs[0].last_fit["shared_input"] == 3 and procs[0].last_fit["loss_best"] < procs[0].last_fit["loss_start"]
    v_keys = [k for k in fitted[0] if k.startswith("v_")]
    assert any(bool(fitted[0][k].any()) for k in v_keys if "theta" in k)
    assert all(torch.equal(f[k], fitted[0][k]) for f in fitted[1:] for k in v_keys)
    assert any(not torch.equal(fitted[0][k], fitted[1][k]) for k in fitted[0] if k.startswith("u_"))
    x = torch.randn(5, n, dtype=torch.float64)
    for p, w, b in zip(procs, ws, fitted, strict=True):
        wt = p.transform_weight(b, w.double())  # the layer runs U (W̃ (Vᵀ x)) with the one shared Vᵀ x
        y = p.apply_output(b, p.apply_input(fitted[0], x) @ wt.T)
        assert float((y - x @ w.double().T).abs().max() / (x @ w.double().T).abs().max()) < 1e-10
    other = make_processor({"name": "harp", "seed": 9, "input_seed": 8, "schedule": "kron", "steps": 2})
    with pytest.raises(HarpqError, match="same input width and input signs"):
        procs[0].fit_shared_input([starts[0], other.init_buffers(32, n)], ws[:2], h,
                                  make_codebook({"name": "e8p", "bits": 2}))
