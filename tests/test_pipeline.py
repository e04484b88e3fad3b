import json

import torch
from click.testing import CliRunner
from conftest import CALIB
from transformers import AutoModelForCausalLM, AutoTokenizer

import harpq
from harpq.cli.main import cli
from harpq.io.model import find_decoder_layers, load_model
from harpq.nn import QuantLinear
from harpq.pipeline.calibration import calibration_windows
from harpq.pipeline.hessian import HessianCollector
from harpq.pipeline.quantize import capture_layer_inputs, run_layer
from harpq.rounding import proxy_loss


def test_checkpoint_layout(tiny_gptq):
    names = {p.name for p in tiny_gptq.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "quant_log.jsonl", "harpq_manifest.json"} <= names
    qc = json.loads((tiny_gptq / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "harpq" and qc["format_version"] == 1
    assert qc["recipe"]["method"] == "gptq" and qc["recipe"]["layer"]["bits"] == 4
    assert len(qc["modules"]) == 2 * 7  # every linear of both decoder layers; lm_head stays
    assert not any("lm_head" in name for name in qc["modules"])
    log = [json.loads(line) for line in (tiny_gptq / "quant_log.jsonl").read_text().splitlines()]
    assert sorted(e["module"] for e in log) == sorted(qc["modules"])
    assert all(0 < e["proxy_loss"] < 0.05 and e["seconds"] >= 0 for e in log)


def test_save_load_is_bit_identical(tiny_path, tiny_gptq):
    # quantize again in memory with the same recipe and data; the saved files must give the same logits
    model = load_model(tiny_path)
    tokens = calibration_windows(AutoTokenizer.from_pretrained(tiny_path), CALIB, 8, 128, seed=0)
    harpq.quantize_model(model, harpq.Recipe.preset("gptq", bits=4, group_size=0), tokens, progress=False)
    model.float()
    loaded = harpq.load(tiny_gptq)
    via_hf = AutoModelForCausalLM.from_pretrained(tiny_gptq, dtype=torch.float32)
    assert isinstance(via_hf.model.layers[1].mlp.down_proj, QuantLinear)
    x = torch.randint(0, 8192, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).logits
        assert torch.equal(loaded(x).logits, ref)
        assert torch.equal(via_hf(x).logits, ref)


def test_quantlinear_keeps_storage_dtype_under_casts(tiny_gptq):
    model = harpq.load(tiny_gptq).to(torch.bfloat16)
    q = model.model.layers[0].self_attn.q_proj
    assert q.scales.dtype == torch.float16 and q.codes.dtype == torch.int32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_saved_weights_reproduce_the_logged_proxy_loss(tiny_path, tiny_gptq):
    # recompute layer 0's input Hessian from the same calibration windows, then score the saved q_proj
    fp = load_model(tiny_path)
    tokens = calibration_windows(AutoTokenizer.from_pretrained(tiny_path), CALIB, 8, 128, seed=0)
    _, layers = find_decoder_layers(fp)
    inputs, kwargs = capture_layer_inputs(fp, layers, tokens, torch.device("cpu"))
    layer = layers[0].float()
    col = HessianCollector({"q": layer.self_attn.q_proj})
    run_layer(layer, inputs, kwargs[0], batch=8, on_batch=col.end_pass)
    q = harpq.load(tiny_gptq).model.layers[0].self_attn.q_proj
    loss = proxy_loss(layer.self_attn.q_proj.weight.detach(), q.effective_weight(), col.hessian("q"))
    logged = json.loads((tiny_gptq / "quant_log.jsonl").read_text().splitlines()[0])
    assert logged["module"] == "model.layers.0.self_attn.q_proj"
    assert abs(loss - logged["proxy_loss"]) < 1e-5 * logged["proxy_loss"]


def test_bits_per_weight_and_eval_json(tiny_gptq, tmp_path, small_text):
    out = tmp_path / "r.json"
    args = ["eval", str(tiny_gptq), "--ppl", str(small_text), "--ctx", "256", "--json", str(out)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["ctx"] == 256 and set(data["ppl"]) == {"gutenberg_small"}
    # 4-bit codes + one fp16 scale and one 4-bit zero per row: just over 4 bits
    assert 4.0 < data["bits_per_weight"] < 4.25
    assert 50 < data["ppl"]["gutenberg_small"] < 400
    assert "gutenberg_small" in res.output


def test_unquantized_eval_counts_16_bits(tiny_path, small_text):
    tok = AutoTokenizer.from_pretrained(tiny_path)
    model = load_model(tiny_path, dtype=torch.float32)
    res = harpq.evaluate(model, [small_text], ctx=128, tokenizer=tok, progress=False)
    assert res["bits_per_weight"] == 16.0


def test_perplexity_matches_direct_loss(tiny_path):
    tok = AutoTokenizer.from_pretrained(tiny_path)
    model = load_model(tiny_path, dtype=torch.float32)
    ids = tok("The quick brown fox jumps over the lazy dog. " * 40, return_tensors="pt").input_ids.view(-1)
    ctx = 64
    windows = ids.numel() // ctx
    from harpq.eval import perplexity

    got = perplexity(model, ids, ctx, batch_size=3, progress=False)
    with torch.no_grad():
        losses = [model(ids[i * ctx:(i + 1) * ctx][None], labels=ids[i * ctx:(i + 1) * ctx][None]).loss
                  for i in range(windows)]
    assert abs(got - float(torch.stack(losses).mean().exp())) < 1e-3 * got


def test_rtn_needs_no_calibration_and_gptq_beats_it(tiny_path, tmp_path, small_text):
    tok = AutoTokenizer.from_pretrained(tiny_path)
    rtn = tmp_path / "rtn"
    harpq.quantize(tiny_path, rtn, harpq.Recipe.preset("rtn", bits=3, group_size=0), progress=False)
    log = [json.loads(line) for line in (rtn / "quant_log.jsonl").read_text().splitlines()]
    assert all(e["proxy_loss"] is None for e in log)
    gptq = tmp_path / "gptq"
    harpq.quantize(tiny_path, gptq, harpq.Recipe.preset("gptq", bits=3, group_size=0), calib=CALIB,
                   nsamples=16, seqlen=256, progress=False)
    ppl = {p.name: harpq.evaluate(p, [small_text], ctx=256, tokenizer=tok, progress=False)["ppl"]["gutenberg_small"]
           for p in (rtn, gptq)}
    assert ppl["gptq"] < ppl["rtn"]


def test_cli_quantize_and_generate(tiny_path, tmp_path):
    out = tmp_path / "cli"
    runner = CliRunner()
    res = runner.invoke(cli, ["quantize", str(tiny_path), str(out), "--method", "rtn", "--bits", "4",
                              "--group-size", "64", "--ragged-groups"])
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").is_file()
    res = runner.invoke(cli, ["generate", str(out), "Once upon a time", "--max-new-tokens", "8"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("Once upon a time") and len(res.stdout.strip()) > len("Once upon a time")


def test_streamed_runs_share_input_sides_as_the_layer_wise_path_draws_them(tiny_path, tmp_path):
    """Without calibration the streamed path finds q/k/v and gate/up by name and seeds their input side as
    the layer-wise path (which sees which linears read one tensor) does: the same signs in both runs, one
    per group."""
    recipe = harpq.Recipe.preset("rtn", bits=4, group_size=64, processor="rht")
    streamed = harpq.quantize(tiny_path, tmp_path / "s", recipe, progress=False)
    layered = harpq.quantize(tiny_path, tmp_path / "l", recipe, calib=CALIB, nsamples=2, seqlen=32, progress=False)
    a, b = harpq.load(streamed), harpq.load(layered)
    for la, lb in zip(a.model.layers, b.model.layers, strict=True):
        q, k, v = (getattr(la.self_attn, n) for n in ("q_proj", "k_proj", "v_proj"))
        assert q.shares_input_side(k) and q.shares_input_side(v) and not q.shares_input_side(la.self_attn.o_proj)
        assert la.mlp.gate_proj.shares_input_side(la.mlp.up_proj)
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
            assert torch.equal(la.get_submodule(name).v_signs, lb.get_submodule(name).v_signs)
    # both store each group's side once (the stream with the group's first linear in its shards' order)
    for out in (streamed, layered):
        modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
        holders = {n: s.get("input_side_from") for n, s in modules.items()}
        assert sum(h is None for h in holders.values()) == 2 * 4  # per layer: one of q/k/v, one of gate/up, o, down
        assert all(modules[h].get("input_side_from") is None for h in holders.values() if h)
