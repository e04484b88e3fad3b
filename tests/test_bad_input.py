"""Every bad input gets a one-line HarpqError and leaves no output directory behind."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import CALIB
from safetensors.torch import load_file, save_file

import harpq
from harpq import HarpqError, Recipe
from harpq.cli.main import cli


def assert_nothing_written(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if "harpq-partial" in p.name]


def quantize_fails(src, out, recipe, match, **kw):
    with pytest.raises(HarpqError, match=match) as info:
        harpq.quantize(src, out, recipe, progress=False, **kw)
    assert "\n" not in str(info.value)
    assert_nothing_written(out)


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out"


def test_missing_model_path(tmp_path, out):
    quantize_fails(tmp_path / "nope", out, Recipe.preset("rtn"), "model path not found")
    with pytest.raises(HarpqError, match="model path not found"):
        harpq.load(tmp_path / "nope")


def test_directory_that_is_not_a_model(tmp_path, out):
    (tmp_path / "empty").mkdir()
    quantize_fails(tmp_path / "empty", out, Recipe.preset("rtn"), "not a model directory")


def test_unsupported_architecture(tmp_path, out):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    save_file({"w": torch.zeros(2)}, d / "model.safetensors")
    quantize_fails(d, out, Recipe.preset("rtn"), "unsupported architecture BertForMaskedLM")


def test_pickle_only_checkpoint_is_refused(tmp_path, tiny_path, out):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(tiny_path / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    quantize_fails(d, out, Recipe.preset("rtn"), "only safetensors")


@pytest.mark.parametrize("bits", [0, 5, 16])
def test_bits_not_offered(tiny_path, out, bits):
    quantize_fails(tiny_path, out, Recipe.preset("gptq", bits=bits), f"not {bits}")


@pytest.mark.parametrize("group", [-1, 4])
def test_group_size_not_offered(tiny_path, out, group):
    quantize_fails(tiny_path, out, Recipe.preset("rtn", group_size=group), "group size must be")


def test_group_size_not_dividing_the_layer(tiny_path, out):
    quantize_fails(tiny_path, out, Recipe.preset("rtn", group_size=96, ragged_groups=False),
                   "does not divide in_features 128 of model.")
    quantize_fails(tiny_path, out, Recipe.preset("rtn", group_size=128, ragged_groups=False),
                   "does not divide in_features 344 of .*down")


def test_nan_and_inf_weights(tmp_path, tiny_path, out):
    d = tmp_path / "broken"
    shutil.copytree(tiny_path, d)
    tensors = load_file(d / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name][3, 7] = float("nan")
    tensors[name][4, 2] = float("inf")
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    quantize_fails(d, out, Recipe.preset("rtn", group_size=0), "model.layers.1.mlp.up_proj.weight has 2 NaN/Inf values")


def test_calibration_text_shorter_than_one_window(tmp_path, tiny_path, out):
    short = tmp_path / "short.txt"
    short.write_text("Too short to calibrate anything.")
    quantize_fails(tiny_path, out, Recipe.preset("gptq", group_size=0), "fewer than one window of 512", calib=short)


def test_calibration_missing_or_not_given(tmp_path, tiny_path, out):
    quantize_fails(tiny_path, out, Recipe.preset("gptq", group_size=0), "calibration file not found",
                   calib=tmp_path / "missing.txt")
    quantize_fails(tiny_path, out, Recipe.preset("gptq", group_size=0), "needs calibration text")


def test_existing_output_needs_overwrite(tiny_path, out):
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(HarpqError, match="exists and is not empty"):
        harpq.quantize(tiny_path, out, Recipe.preset("rtn", group_size=0), progress=False)
    assert (out / "keep.txt").read_text() == "user data"
    harpq.quantize(tiny_path, out, Recipe.preset("rtn", group_size=0), overwrite=True, progress=False)
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_corrupt_or_tampered_checkpoint(tmp_path, tiny_gptq):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_gptq, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-100] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(HarpqError, match="checksum mismatch for .*model.safetensors"):
        harpq.load(bad)
    shutil.copytree(tiny_gptq, tmp_path / "nomanifest")
    (tmp_path / "nomanifest" / "harpq_manifest.json").unlink()
    with pytest.raises(HarpqError, match="no harpq_manifest.json"):
        harpq.load(tmp_path / "nomanifest")


def test_cpu_machine_asked_for_cuda(tiny_path, out):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    quantize_fails(tiny_path, out, Recipe.preset("rtn", group_size=0), "no CUDA GPU", device="cuda")


def test_cli_prints_one_line_and_exits_2(tmp_path):
    res = CliRunner().invoke(cli, ["quantize", str(tmp_path / "nope"), str(tmp_path / "o"), "--method", "rtn"])
    assert res.exit_code == 2
    assert res.stderr.strip().count("\n") == 0
    assert res.stderr.startswith("harpq: error: model path not found")
    res = CliRunner().invoke(cli, ["eval", str(tmp_path / "nope"), "--ppl", str(CALIB)])
    assert res.exit_code == 2 and "model path not found" in res.stderr
