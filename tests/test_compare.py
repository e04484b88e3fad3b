import importlib
import json

import pytest
from click.testing import CliRunner
from conftest import CALIB, TASKS_DIR

from harpq import HarpqError
from harpq.cli.main import cli
from harpq.eval.compare import compare, layer_medians

PNG = b"\x89PNG\r\n\x1a\n"


def test_compare_writes_a_report_and_resumes(tiny_path, tmp_path, small_text, monkeypatch):
    out = tmp_path / "cmp"
    args = ["compare", str(tiny_path), str(out), "--methods", "rtn,gptq", "--bits", "4,2", "--ppl", str(small_text),
            "--calib", str(CALIB), "--nsamples", "4", "--seqlen", "64", "--ctx", "64", "--tasks", "arc_easy",
            "--tasks-dir", str(TASKS_DIR), "--limit", "4"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    runs = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    assert set(runs) == {"fp", "rtn-4bit", "gptq-4bit", "rtn-2bit", "gptq-2bit"}
    assert runs["gptq-2bit"]["tasks"]["arc_easy"]["n"] == 4 and runs["fp"]["bits_per_weight"] == 16.0
    assert runs["gptq-2bit"]["bits_per_weight"] < runs["gptq-4bit"]["bits_per_weight"]
    report = (out / "report.md").read_text()
    assert "## 2 bits" in report and "| gptq 2-bit |" in report and "ppl_vs_bits.png" in report
    for png in ("ppl_vs_bits.png", "proxy_loss_by_layer.png"):
        assert (out / png).read_bytes()[:8] == PNG and (out / png).stat().st_size > 10_000
    # the terminal ends with one Markdown table of every run, FP first; no raw JSON on the way
    table = res.output[res.output.index("| run "):].split("\n\n")[0].splitlines()
    assert [c.strip() for c in table[0].split("|")[1:-1]] == ["run", "bits/weight", "ppl gutenberg_small",
                                                              "arc_easy", "quantize s"]
    names = [row.split("|")[1].strip() for row in table[2:]]
    assert names[0] == "fp" and set(names[1:3]) == {"gptq 2-bit", "rtn 2-bit"} and set(names[3:]) == {
        "gptq 4-bit", "rtn 4-bit"}
    assert "{" not in res.output and "quantized in" in res.output
    # every quantized model is kept and loads
    for name in ("rtn-4bit", "gptq-4bit", "rtn-2bit", "gptq-2bit"):
        assert runs[name]["path"] == str(out / "models" / name) and (out / "models" / name / "config.json").is_file()

    def refuse(*a, **k):
        raise AssertionError("a finished run must not be quantized again")

    monkeypatch.setattr(importlib.import_module("harpq.api"), "quantize", refuse)
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0 and res.output.count("done before with these settings, kept") == 5
    # another text file: the kept records do not describe it, so every run is redone
    other = tmp_path / "other.txt"
    other.write_text(small_text.read_text()[::-1])
    calls = []
    monkeypatch.setattr(importlib.import_module("harpq.api"), "quantize",
                        lambda *a, **k: calls.append(a[1]) or refuse())
    res = CliRunner().invoke(cli, [a if a != str(small_text) else str(other) for a in args])
    assert res.exit_code != 0 and calls and "other model, files or settings: redone" in res.output


def test_compare_checks_its_plan_before_any_work(tiny_path, tmp_path, small_text):
    with pytest.raises(HarpqError, match="unknown method 'awq'"):
        compare(tiny_path, tmp_path / "x", ["rtn", "awq"], [4], [small_text])
    with pytest.raises(HarpqError, match="2, 3 and 4 bits, not 8"):
        compare(tiny_path, tmp_path / "x", ["rtn"], [8], [small_text])
    assert not (tmp_path / "x").exists()


def test_layer_medians():
    proxy = {"model.layers.0.a": 1.0, "model.layers.0.b": 3.0, "model.layers.1.a": 2.0, "lm_head": 9.0,
             "model.layers.1.b": None}
    assert layer_medians(proxy) == {0: 2.0, 1: 2.0}


def test_compare_of_calibration_free_methods_draws_no_empty_plot_and_can_drop_models(tiny_path, tmp_path,
                                                                                     small_text):
    out = tmp_path / "cmp"
    res = CliRunner().invoke(cli, ["compare", str(tiny_path), str(out), "--methods", "rtn,hqq", "--bits", "4",
                                   "--group-size", "32", "--ppl", str(small_text), "--ctx", "64",
                                   "--max-windows", "3", "--no-keep-models"])
    assert res.exit_code == 0, res.output
    runs = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    assert runs["rtn-4bit"]["windows"] == {"gutenberg_small": [3, runs["fp"]["windows"]["gutenberg_small"][1]]}
    assert "path" not in runs["rtn-4bit"] and not (out / "models" / "rtn-4bit").exists()
    # the group size reached the quantizer: an fp16 scale and a 4-bit zero per 32 weights (128: 4.16 bits)
    assert runs["rtn-4bit"]["key"]["settings"] == {"rtn": {"group_size": 32}, "gptq": {"group_size": 32},
                                                   "hqq": {"group_size": 32}}
    assert 4 + 20 / 32 <= runs["rtn-4bit"]["bits_per_weight"] < 4.7
    assert not (out / "proxy_loss_by_layer.png").exists() and "proxy_loss" not in (out / "report.md").read_text()
    assert "over 3 of" in (out / "report.md").read_text()
