import json
import logging

import pytest
import torch
from conftest import CALIB
from helpers import random_hessian
from torch import nn

import harpq
from harpq import HarpqError
from harpq.io.model import find_decoder_layers, layer_linears, load_model
from harpq.processors import make_processor
from harpq.processors.incoherence import hessian_incoherence, weight_incoherence
from harpq.processors.sides import hadamard_or_fft

SHAPES = [(128, 128), (344, 128), (512, 1376), (172, 156 * 2), (30, 50)]  # last: randomized-FFT fallback


class ProcessedLinear(nn.Module):
    """y = U · W̃ · (Vᵀ x) with the processed weight kept unquantized."""

    def __init__(self, linear: nn.Linear, processor):
        super().__init__()
        m, n = linear.weight.shape
        self.p = processor
        self.b = {k: v for k, v in processor.init_buffers(m, n).items()}
        self.w = processor.transform_weight(self.b, linear.weight.detach())

    def forward(self, x):
        return self.p.apply_output(self.b, self.p.apply_input(self.b, x) @ self.w.T)


@pytest.mark.parametrize("name", ["rht", "rht-block", "kron"])
def test_processed_model_equals_original_in_float64(tiny_path, name):
    model = load_model(tiny_path, dtype=torch.float64)
    x = torch.randint(0, 8192, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).logits
    prefix, layers = find_decoder_layers(model)
    for i, layer in enumerate(layers):
        for rel, lin in layer_linears(layer).items():
            proc = make_processor({"name": name, "seed": i, "input_seed": 7 * i})
            parent, _, child = rel.rpartition(".")
            setattr(layer.get_submodule(parent), child, ProcessedLinear(lin, proc))
    with torch.no_grad():
        got = model(x).logits
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-10


@pytest.mark.parametrize("name", ["rht", "rht-block", "kron"])
@pytest.mark.parametrize("m,n", SHAPES)
def test_function_and_proxy_preserved(name, m, n):
    proc = make_processor({"name": name, "seed": 1, "input_seed": 2})
    b = proc.init_buffers(m, n)
    w = torch.randn(m, n, dtype=torch.float64)
    x = torch.randn(6, n, dtype=torch.float64)
    y = proc.apply_output(b, proc.apply_input(b, x) @ proc.transform_weight(b, w).T)
    assert float((y - x @ w.T).abs().max() / (x @ w.T).abs().max()) < 1e-10
    h = random_hessian(n, tokens=2 * n)
    wt, ht = proc.transform_weight(b, w), proc.transform_hessian(b, h)
    assert torch.allclose(torch.trace(wt @ ht @ wt.T), torch.trace(w @ h @ w.T), rtol=1e-10)


@pytest.mark.parametrize("name", ["rht", "rht-block", "kron"])
def test_seeds_reproduce_and_differ(name):
    a = make_processor({"name": name, "seed": 5, "input_seed": 9}).init_buffers(344, 128)
    b = make_processor({"name": name, "seed": 5, "input_seed": 9}).init_buffers(344, 128)
    c = make_processor({"name": name, "seed": 6, "input_seed": 9}).init_buffers(344, 128)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[next(k for k in a if k.startswith("u_"))], c[next(k for k in c if k.startswith("u_"))])
    assert all(torch.equal(a[k], c[k]) for k in a if k.startswith("v_"))  # same input seed, same input side


def test_fft_fallback_is_logged_and_odd_sizes_rejected(caplog):
    with caplog.at_level(logging.WARNING):
        side = hadamard_or_fft(50, "layer.x")
    assert side.kind == "fft" and "randomized FFT" in caplog.text
    with pytest.raises(HarpqError, match="size 43 of layer.x is odd"):
        hadamard_or_fft(43, "layer.x")


def test_rht_spreads_outliers():
    w = torch.randn(256, 512, dtype=torch.float64) * 0.02
    w[3, 7] = 5.0
    proc = make_processor({"name": "rht", "seed": 0})
    b = proc.init_buffers(256, 512)
    assert weight_incoherence(proc.transform_weight(b, w)) < weight_incoherence(w) / 10
    hd = torch.diag(torch.linspace(1, 100, 512, dtype=torch.float64))  # eigenvectors = coordinate axes
    assert hessian_incoherence(proc.transform_hessian(b, hd)) < hessian_incoherence(hd) / 3


def test_quip_method_end_to_end(tiny_path, tmp_path, small_text):
    out = tmp_path / "quip"
    harpq.quantize(tiny_path, out, harpq.Recipe.preset("quip", bits=2), calib=CALIB, nsamples=8, seqlen=128,
                   progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    spec = qc["modules"]["model.layers.0.mlp.down_proj"]
    assert spec["processor"]["name"] == "kron" and spec["codebook"]["scale"] == "rms"
    model = harpq.load(out)
    down = model.model.layers[0].mlp.down_proj
    assert down.u_left.dtype == torch.float16 and down.scales.shape == (1, 1)
    # q, k and v read one input: they share one input-side transform; o_proj has its own
    attn = model.model.layers[0].self_attn
    assert torch.equal(attn.q_proj.v_perm, attn.k_proj.v_perm) and torch.equal(attn.q_proj.v_perm, attn.v_proj.v_perm)
    assert not torch.equal(attn.q_proj.u_perm, attn.k_proj.u_perm[: attn.q_proj.u_perm.numel()])
    ppl = harpq.evaluate(model, [small_text], ctx=128, tokenizer=harpq.io.model.load_tokenizer(out), progress=False)
    assert 50 < ppl["ppl"]["gutenberg_small"] < 2000


def test_rht_override_on_the_cli_recipe(tiny_path, tmp_path):
    out = tmp_path / "rht"
    recipe = harpq.Recipe.preset("gptq", bits=3, group_size=0, processor="rht")
    harpq.quantize(tiny_path, out, recipe, calib=CALIB, nsamples=8, seqlen=128, progress=False)
    log = [json.loads(line) for line in (out / "quant_log.jsonl").read_text().splitlines()]
    assert all(e["processor"] == "rht" and e["incoherence"]["w_after"] is not None for e in log)
    spec = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert spec["model.layers.0.mlp.down_proj"]["processor"]["sides"]["in"] == {"kind": "hadamard", "k": 172}


def test_a_hadamard_side_of_the_wrong_order_is_refused_not_looped_on():
    """A processor's sides are bound to one shape; reusing it for another width must fail in one line (it
    used to loop forever building the stage plan)."""
    from harpq.errors import HarpqError
    from harpq.processors import make_processor

    p = make_processor({"name": "rht", "seed": 1})
    p.init_buffers(4096, 4096)
    with pytest.raises(HarpqError, match="cannot have a dense factor of order 1"):
        p.init_buffers(11008, 4096)


def test_block_hadamard_mixes_only_within_blocks_and_says_which_block():
    from harpq.processors.sides import BlockHadamardSide

    proc = make_processor({"name": "rht-block", "seed": 1})
    b = proc.init_buffers(1376, 512)
    assert proc.side("in", 512).spec() == {"kind": "hadamard-block", "block": 128}
    assert proc.side("out", 1376).spec() == {"kind": "hadamard-block", "block": 32}  # 1376 = 43 · 32
    e = torch.zeros(512, dtype=torch.float64)
    e[200] = 1.0
    q = proc.side("in", 512).forward(b, "v_", e)
    assert set(q.nonzero().flatten().tolist()) == set(range(128, 256))  # all of its block, nothing else
    assert torch.allclose(q.abs(), torch.full_like(q, 128 ** -0.5).where(q != 0, q))
    assert make_processor(proc.config()).config() == proc.config()
    with pytest.raises(HarpqError, match="power-of-two block dividing"):
        BlockHadamardSide(512, 96)
    with pytest.raises(HarpqError, match="odd"):
        make_processor({"name": "rht-block", "seed": 1, "block": 64}).init_buffers(31, 64)


def test_shared_input_sides_are_stored_once_and_tied_on_load(tiny_path, tmp_path):
    """q/k/v and gate/up under the RHT draw one input side: the checkpoint holds it with q_proj (gate_proj),
    the others name it, every loader ties them to it, and bits per weight count it once."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harpq.io.model import load_model
    from harpq.nn import QuantLinear
    from harpq.pipeline.calibration import calibration_windows

    out = tmp_path / "qs"
    recipe = harpq.Recipe.preset("quipsharp")
    harpq.quantize(tiny_path, out, recipe, calib=CALIB, nsamples=4, seqlen=64, progress=False)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    for i in range(2):
        at = f"model.layers.{i}."
        assert f"{at}self_attn.q_proj.v_signs" in keys and f"{at}mlp.gate_proj.v_signs" in keys
        for member, leader in (("self_attn.k_proj", "self_attn.q_proj"), ("self_attn.v_proj", "self_attn.q_proj"),
                               ("mlp.up_proj", "mlp.gate_proj")):
            assert f"{at}{member}.v_signs" not in keys and f"{at}{member}.u_signs" in keys
            assert modules[at + member]["input_side_from"] == at + leader
        assert "input_side_from" not in modules[f"{at}self_attn.o_proj"]

    memory = load_model(tiny_path)
    tokens = calibration_windows(AutoTokenizer.from_pretrained(tiny_path), CALIB, 4, 64, seed=0)
    harpq.quantize_model(memory, recipe, tokens, progress=False)
    memory.float()
    x = torch.randint(0, 8192, (2, 32), generator=torch.Generator().manual_seed(0))
    for loaded in (harpq.load(out), AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)):
        attn = loaded.model.layers[1].self_attn
        assert attn.k_proj.v_signs is attn.q_proj.v_signs and bool(attn.q_proj.v_signs.abs().min() == 1)
        with torch.no_grad():
            assert torch.equal(loaded(x).logits, memory(x).logits)
    k = attn.k_proj
    side = sum(getattr(k, n).numel() * getattr(k, n).element_size() * 8 for n in k.input_side_names())
    alone = QuantLinear.from_spec({**k.spec(), "input_side_from": None})
    assert side > 0 and k.stored_bits() == alone.stored_bits() - side
    log = {e["module"]: e for e in map(json.loads, (out / "quant_log.jsonl").read_text().splitlines())}
    logged = log["model.layers.1.self_attn.k_proj"]["bits_per_weight"]  # the log counts the side once too
    assert logged == pytest.approx(k.stored_bits() / (k.in_features * k.out_features), abs=1e-5)
    assert set(log) == set(modules)


def test_a_borrowed_input_side_must_exist_and_match():
    from harpq.nn import QuantLinear, tie_input_sides

    spec = {"in_features": 64, "out_features": 32, "bias": False, "codebook": {"name": "e8p", "bits": 2},
            "processor": {"name": "rht", "seed": 0}}
    root = torch.nn.Module()
    root.a = QuantLinear.from_spec(spec)
    root.b = QuantLinear.from_spec({**spec, "input_side_from": "c"})
    with pytest.raises(ValueError, match="c, which the model does not have"):
        tie_input_sides(root)
    root.c = QuantLinear.from_spec({**spec, "in_features": 128})
    with pytest.raises(ValueError, match="does not apply the same input side"):
        tie_input_sides(root)
