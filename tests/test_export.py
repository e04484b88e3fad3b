"""Export to compressed-tensors and GPTQ: read back by the compressed-tensors package and transformers, and
by a GPTQ reader written here from the format's description; every format that cannot be expressed refused."""

import json

import pytest
import torch
from safetensors.torch import load_file

import harpq
from harpq import HarpqError, Recipe
from harpq.io.export import export

pytest.importorskip("compressed_tensors")


@pytest.fixture(scope="module")
def quantized(tiny_path, tmp_path_factory):
    """llama-tiny (bf16) quantized with RTN 4-bit g8 (344 = 43·8), RTN 4-bit per row and GPTQ 8-bit per row."""
    from conftest import CALIB

    d = tmp_path_factory.mktemp("export")
    return {
        "rtn4": harpq.quantize(tiny_path, d / "rtn4", Recipe.preset("rtn", bits=4, group_size=8), progress=False),
        "rtn4row": harpq.quantize(tiny_path, d / "rtn4row", Recipe.preset("rtn", bits=4, group_size=0),
                                  progress=False),
        "gptq8": harpq.quantize(tiny_path, d / "gptq8", Recipe.preset("gptq", bits=8, group_size=0), calib=CALIB,
                                nsamples=4, seqlen=64, progress=False),
    }


def decoded(model_dir, name):
    """harpq's own decode of one module, with scales as the target keeps them (bf16 here)."""
    q = harpq.load(model_dir).get_submodule(name)
    bufs = {k: getattr(q, k) for k in ("codes", "scales", "zeros")}
    return q.format, bufs


@pytest.mark.parametrize("which,bits,group", [("rtn4", 4, 8), ("gptq8", 8, None)])
def test_compressed_tensors_decompress_equals_harpq_decode(quantized, tmp_path, which, bits, group):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    out = export(quantized[which], tmp_path / "ct", "compressed-tensors")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert cfg["ignore"] == ["lm_head"]
    tensors = load_file(out / "model.safetensors")
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group" if group else "channel",
                            group_size=group)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        got = PackedQuantizationCompressor.decompress(state, QuantizationScheme(targets=["Linear"], weights=args))
        fmt, bufs = decoded(quantized[which], name)
        bufs["scales"] = bufs["scales"].to(torch.bfloat16).half()  # what the target stores
        want = fmt.decode(bufs, *got["weight"].shape).to(got["weight"].dtype)
        assert torch.equal(got["weight"], want), name


@pytest.mark.parametrize("which", ["rtn4", "gptq8"])
def test_transformers_loads_the_export_with_compressed_tensors(quantized, tmp_path, which):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    out = export(quantized[which], tmp_path / "ct", "compressed-tensors")
    # dequantize=True: this transformers / compressed-tensors pair cannot load packed asymmetric zero-points
    # into compressed modules (it expects them unpacked); vLLM reads them packed, as written
    ct = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                              quantization_config=CompressedTensorsConfig(dequantize=True))
    ours = harpq.load(quantized[which])
    ids = torch.randint(0, 8192, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, ct(ids).logits
    # the rounding stated by the export: scales and the dequantized weights in the model's bf16
    assert (a - b).norm() / a.norm() < 1e-2


def read_gptq(tensors, name, bits, group):
    """The GPTQ layout from its description: qweight packs 32/b input rows per int32 (lowest bits first),
    qzeros packs 32/b output columns per int32 and holds zero − 1, scales (groups, out), g_idx per column."""
    per = 32 // bits
    mask = (1 << bits) - 1
    qw = tensors[f"{name}.qweight"].to(torch.int64) & 0xFFFFFFFF
    q = torch.stack([(qw >> (bits * k)) & mask for k in range(per)], dim=1).reshape(-1, qw.shape[1])  # (in, out)
    qz = tensors[f"{name}.qzeros"].to(torch.int64) & 0xFFFFFFFF
    z = torch.stack([(qz >> (bits * k)) & mask for k in range(per)], dim=2).reshape(qz.shape[0], -1) + 1
    g_idx = tensors[f"{name}.g_idx"].long()
    scales = tensors[f"{name}.scales"].float()
    return ((q - z[g_idx]) * scales[g_idx]).T  # (out, in)


@pytest.mark.parametrize("which,bits,group", [("rtn4row", 4, 0), ("gptq8", 8, 0)])
def test_gptq_layout_round_trips_through_an_independent_reader(quantized, tmp_path, which, bits, group):
    out = export(quantized[which], tmp_path / "gptq", "gptq")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg == {**cfg, "quant_method": "gptq", "bits": bits, "group_size": group or -1, "desc_act": False,
                   "sym": False, "checkpoint_format": "gptq"}
    tensors = load_file(out / "model.safetensors")
    model = harpq.load(quantized[which])
    fp = harpq.load(quantized[which])
    for name, mod in list(model.named_modules()):
        if hasattr(mod, "effective_weight"):
            w = read_gptq(tensors, name, bits, group)
            assert torch.equal(w, mod.dequantized_weight()), name  # codes, zeros and scales exactly
            parent, _, child = name.rpartition(".")
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data = w
            setattr(fp.get_submodule(parent), child, lin)
    ids = torch.randint(0, 8192, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(fp(ids).logits, model(ids).logits, atol=1e-5)


REFUSED = [
    ("quipsharp", {}, "e8p codebook"),
    ("hqq", {"group_size": 8}, "fractional fp16 zero-points"),
    ("quip", {}, "one scale per matrix"),
    ("rtn", {"bits": 3, "group_size": 8}, "3-bit codes"),
    ("rtn", {"bits": 2, "group_size": 8}, "2-bit codes"),
    ("rtn", {"group_size": 128, "ragged_groups": True}, "shorter last group"),
    ("rtn", {"group_size": 8, "processor": "rht"}, "rht processor"),
]


@pytest.mark.parametrize("method,settings,match", REFUSED, ids=[f"{m}-{s}" for m, s, _ in REFUSED])
@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_what_cannot_be_expressed_is_refused(tiny_path, tmp_path, method, settings, match, fmt):
    from conftest import CALIB

    calib = None if method in ("rtn", "hqq") else CALIB
    q = harpq.quantize(tiny_path, tmp_path / "q", Recipe.preset(method, **settings), calib=calib, nsamples=4,
                       seqlen=64, progress=False)
    with pytest.raises(HarpqError, match=match) as info:
        export(q, tmp_path / "out", fmt)
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


def test_gptq_cannot_hold_a_zero_point_of_zero(quantized, tmp_path):
    # groups of 8 in this model include all-positive ones: their zero-point is 0
    with pytest.raises(HarpqError, match="zero-points of 0"):
        export(quantized["rtn4"], tmp_path / "g", "gptq")


def test_other_inputs_are_refused(tiny_path, quantized, tmp_path):
    with pytest.raises(HarpqError, match="not a harpq-quantized model"):
        export(tiny_path, tmp_path / "a", "gptq")
    with pytest.raises(HarpqError, match="unknown export format"):
        export(quantized["rtn4"], tmp_path / "b", "awq")
    with pytest.raises(HarpqError, match="reads"):
        export(quantized["rtn4"], quantized["rtn4"], "gptq", overwrite=True)


def test_gptq_needs_one_bit_width(tiny_path, tmp_path):
    recipe = Recipe.preset("rtn", bits=4, group_size=8)
    recipe.overrides.append((r"down_proj$", {"bits": 8}))
    q = harpq.quantize(tiny_path, tmp_path / "q", recipe, progress=False)
    with pytest.raises(HarpqError, match="one bit width"):
        export(q, tmp_path / "out", "gptq")
    cfg = json.loads((export(q, tmp_path / "ct", "compressed-tensors") / "config.json").read_text())
    assert len(cfg["quantization_config"]["config_groups"]) == 2  # compressed-tensors: one group per scheme


def test_cli_quantize_straight_to_compressed_tensors(tiny_path, tmp_path):
    from click.testing import CliRunner

    from harpq.cli.main import cli

    out = tmp_path / "ct"
    res = CliRunner().invoke(cli, ["quantize", str(tiny_path), str(out), "--method", "rtn", "--group-size", "8",
                                   "--format", "compressed-tensors"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    assert [p.name for p in tmp_path.iterdir()] == ["ct"]
