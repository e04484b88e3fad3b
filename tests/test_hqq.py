import importlib
import json

import pytest
import torch
from conftest import CALIB
from transformers import AutoModelForCausalLM

import harpq
from harpq.codebooks import ScalarGrid
from harpq.codebooks.hqq import hqq_solve
from harpq.rounding import nearest


def heavy_tailed(rows=512, cols=256):
    return torch.distributions.StudentT(torch.tensor(3.0)).sample((rows, cols))


def lp_error(w, recon, p=0.7):
    return float((w - recon).abs().pow(p).mean())


def plain_minmax(groups, bits):
    """Plain min–max RTN: 2^b levels spanning each group's [min, max] (the solver's starting point)."""
    lo, hi = groups.amin(1, keepdim=True), groups.amax(1, keepdim=True)
    scale = (hi - lo) / (2**bits - 1)
    return torch.round((groups - lo) / scale) * scale + lo


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_solver_beats_plain_minmax_rtn_on_heavy_tails(bits):
    torch.manual_seed(bits)
    w = heavy_tailed()
    cb = ScalarGrid(bits, 64, scale="hqq")
    solved = lp_error(w, nearest(w, cb, cb.prepare(w))[1])
    groups = w.reshape(-1, 64)
    assert solved < lp_error(groups, plain_minmax(groups, bits))


def test_solver_is_deterministic_and_decodes_exactly():
    torch.manual_seed(0)
    w = heavy_tailed(64, 192)
    a, b = hqq_solve(w.reshape(-1, 64), 3), hqq_solve(w.reshape(-1, 64), 3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    cb = ScalarGrid(3, 64, scale="hqq")
    state = cb.prepare(w)
    codes, recon = nearest(w, cb, state)
    assert torch.equal(cb.decode(cb.encode(codes, state), 64, 192), recon)
    assert cb.buffer_specs(64, 192)["zeros"] == ((64, 3), torch.float16)  # fractional zero-points


def reference_hqq(groups, bits, p=0.7, beta=10.0, kappa=1.01, iters=20):
    """The half-quadratic iteration written out in weight units, one step per line of the paper."""
    maxq = 2**bits - 1
    lo, hi = groups.amin(1, keepdim=True), groups.amax(1, keepdim=True)
    inv = maxq / (hi - lo)
    zero = -lo * inv
    best, best_zero, stopping = float("inf"), zero, False
    for step in range(iters + 1):
        q = torch.clamp(torch.round(groups * inv + zero), 0, maxq)
        err = groups - (q - zero) / inv
        if err.abs().mean() < best:
            best, best_zero = float(err.abs().mean()), zero
            improved = True
        elif stopping:
            break
        else:
            improved = False
        if step == iters:
            break
        stopping = not improved
        w_e = torch.sign(err) * torch.relu(err.abs() - err.abs().pow(p - 1) / beta)
        zero = torch.mean(q - (groups - w_e) * inv, 1, keepdim=True)
        beta *= kappa
    return (1 / inv).view(-1), best_zero.view(-1)


@pytest.mark.parametrize("bits", [2, 4])
def test_solver_matches_the_written_out_iteration(bits):
    torch.manual_seed(10 + bits)
    groups = heavy_tailed(256, 128).reshape(-1, 64).double()
    scale, zero = hqq_solve(groups, bits)
    ref_scale, ref_zero = reference_hqq(groups, bits)
    assert torch.allclose(scale.double(), ref_scale, rtol=1e-6)
    # float32 vs float64: a rounding tie may flip and send a rare group down another path
    assert ((zero.double() - ref_zero).abs() < 1e-4).double().mean() > 0.99
    err = [float((groups - (torch.round(groups / s[:, None] + z[:, None]).clamp(0, 2**bits - 1) - z[:, None])
                  * s[:, None]).abs().mean()) for s, z in ((scale.double(), zero.double()), (ref_scale, ref_zero))]
    assert err[0] == pytest.approx(err[1], rel=1e-4)
    assert not torch.allclose(zero.double(), reference_hqq(groups, bits, iters=0)[1], atol=1e-3)  # it moved


def test_hqq_streams_without_loading_the_model(tiny_path, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the calibration-free path must not load the model")

    monkeypatch.setattr(importlib.import_module("harpq.pipeline.quantize"), "load_model", refuse)
    out = tmp_path / "hqq"
    harpq.quantize(tiny_path, out, harpq.Recipe.preset("hqq", bits=3, group_size=64, ragged_groups=True),
                   progress=False)
    monkeypatch.undo()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["calibration"] is None and len(qc["modules"]) == 14
    assert qc["modules"]["model.layers.0.self_attn.q_proj"]["codebook"]["scale"] == "hqq"
    loaded = harpq.load(out)
    via_hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    x = torch.randint(0, 8192, (1, 24))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, via_hf(x).logits)


def test_hqq_codebook_with_ldlq_and_a_processor(tiny_path, tmp_path):
    out = tmp_path / "gptq-hqq"
    recipe = harpq.Recipe.preset("gptq", bits=3, group_size=0, codebook="hqq", processor="rht")
    harpq.quantize(tiny_path, out, recipe, calib=CALIB, nsamples=4, seqlen=64, progress=False)
    log = [json.loads(line) for line in (out / "quant_log.jsonl").read_text().splitlines()]
    assert all(e["codebook"]["scale"] == "hqq" and e["rounding"] == "ldlq" and e["proxy_loss"] < 0.1 for e in log)


def test_float16_solve_is_as_good_as_float32():
    torch.manual_seed(3)
    groups = (heavy_tailed(256, 256) * 0.02).reshape(-1, 64)

    def error(scale, zero):
        q = torch.round(groups / scale[:, None] + zero[:, None]).clamp(0, 7)
        return float(((q - zero[:, None]) * scale[:, None] - groups).abs().mean())

    e32, e16 = error(*hqq_solve(groups, 3)), error(*hqq_solve(groups.half(), 3))
    assert e16 == pytest.approx(e32, rel=5e-3) and e16 < float((plain_minmax(groups, 3) - groups).abs().mean())
