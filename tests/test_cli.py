"""The command line as a new user meets it: quick help, the methods table, recipes in and out, --ignore and
--override, evaluation beside the FP baseline, window limits, logging, and the messages on the way."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import TASKS_DIR

import harpq
from harpq.cli.main import _set_logging, cli
from harpq.eval.perplexity import perplexity, spread_windows
from harpq.recipe import METHODS


def invoke(args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


@pytest.fixture(autouse=True)
def quiet_logging():
    yield
    _set_logging(False)  # -v in one test must not leave the next one verbose


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("HARPQ_CACHE", str(d))
    return d


def test_help_and_methods_import_neither_torch_nor_transformers():
    code = ("import sys\nfrom harpq.cli.main import main\n"
            "for argv in (['--help'], ['quantize', '--help'], ['eval', '--help'], ['methods']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code in (0, None), e.code\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False False"


def test_import_harpq_registers_with_transformers_when_transformers_loads():
    code = ("import sys, harpq\nassert 'transformers' not in sys.modules\n"
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING\n"
            "print(AUTO_QUANTIZER_MAPPING['harpq'].__name__, AUTO_QUANTIZATION_CONFIG_MAPPING['harpq'].__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["HarpqHfQuantizer", "HarpqConfig"]


def test_methods_lists_every_method_with_its_defaults():
    res = invoke(["methods", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["method"]: r for r in json.loads(res.output)}
    assert set(rows) == set(METHODS)
    for method, row in rows.items():
        layer = harpq.Recipe.preset(method).layer
        assert row["bits"] == layer.bits and row["processor"] == layer.processor
        assert row["calibration"] == ("yes" if layer.needs_hessian else "no")
    assert rows["hqq"]["group"] == "64" and rows["quip"]["group"] == "row" and rows["quipsharp"]["group"] == "-"
    table = invoke(["methods"]).output
    assert table.startswith("| method") and all(f"| {m} " in table for m in METHODS)


def test_defaults_quantize_the_bundled_model_and_no_ragged_groups_refuses(tiny_path, tmp_path):
    res = invoke(["quantize", tiny_path, tmp_path / "q", "--method", "rtn"])  # 128 does not divide 344
    assert res.exit_code == 0, res.output
    specs = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["modules"]
    assert any(s["in_features"] % 128 for s in specs.values())
    res = invoke(["quantize", tiny_path, tmp_path / "q2", "--method", "hqq", "--no-ragged-groups"])
    assert res.exit_code == 2 and "does not divide in_features 344" in res.output
    assert not (tmp_path / "q2").exists()


def _quant_config(path):
    return json.loads((path / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("suffix", ["json", "yaml"])
def test_ignore_override_and_a_recipe_file_reproduce_a_run(tiny_path, tmp_path, suffix):
    recipe_file = tmp_path / f"recipe.{suffix}"
    args = ["quantize", tiny_path, tmp_path / "a", "--method", "rtn", "--bits", "3", "--ignore", r"layers\.1\.mlp",
            "--override", r"self_attn\.o_proj:bits=8,group_size=64", "--save-recipe", recipe_file]
    res = invoke(args)
    assert res.exit_code == 0, res.output
    specs = _quant_config(tmp_path / "a")["modules"]
    assert not any("layers.1.mlp" in name for name in specs) and any("layers.0.mlp" in name for name in specs)
    o_proj = [s for name, s in specs.items() if name.endswith("o_proj")]
    assert o_proj and all(s["codebook"]["bits"] == 8 and s["codebook"]["group_size"] == 64 for s in o_proj)
    assert all(s["codebook"]["bits"] == 3 for name, s in specs.items() if name.endswith("q_proj"))
    # the file holds the whole run; quantizing from it alone makes the same model, bit for bit
    res = invoke(["quantize", tiny_path, tmp_path / "b", "--recipe", recipe_file])
    assert res.exit_code == 0, res.output
    assert _quant_config(tmp_path / "b")["modules"] == specs
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    # a checkpoint's recorded recipe works as well; options given change it
    res = invoke(["quantize", tiny_path, tmp_path / "c", "--recipe", tmp_path / "a", "--bits", "4"])
    assert res.exit_code == 0, res.output
    changed = _quant_config(tmp_path / "c")["modules"]
    assert set(changed) == set(specs)
    assert all(s["codebook"]["bits"] == (8 if name.endswith("o_proj") else 4) for name, s in changed.items())


def test_dry_run_prints_the_recipe_and_writes_no_model(tiny_path, tmp_path):
    res = invoke(["quantize", tiny_path, tmp_path / "q", "--method", "gptq", "--bits", "3", "--calib", "c.txt",
                  "--nsamples", "16", "--dry-run"])
    assert res.exit_code == 0, res.output
    content = json.loads(res.output)
    assert content["method"] == "gptq" and content["layer"]["bits"] == 3 and content["layer"]["rounding"] == "ldlq"
    assert content["calibration"] == {"calib": "c.txt", "nsamples": 16, "seqlen": 512, "seed": 0}
    assert not (tmp_path / "q").exists()


RECIPE_BAD = [
    (["--override", "nocolon"], "write it as REGEX:key=value"),
    (["--override", "x:bits"], "'bits' is not key=value"),
    (["--override", "x:bits=abc"], "bits takes an integer, not 'abc'"),
    (["--override", "x:colour=red"], "unknown setting 'colour'"),
    (["--override", "x:act_order=maybe"], "act_order takes true or false"),
    (["--override", "(:bits=4"], "is not a regular expression"),
    (["--override", "o_proj:bits=5"], "offers"),
    (["--ignore", "[a-"], "is not a regular expression"),
    (["--recipe", "{tmp}/missing.json"], "recipe file not found"),
    (["--recipe", "{tmp}/broken.json"], "does not parse"),
    (["--recipe", "{tmp}/broken.yaml"], "does not parse"),
    (["--recipe", "{tmp}/unknown_key.json"], "unknown key(s) colour"),
    (["--recipe", "{tmp}/bad_method.json"], "method must be one of"),
    (["--recipe", "{tmp}/bad_layer.json"], "bits takes int, not 4.5"),
    (["--recipe", "{tmp}/list.json"], "a recipe is a mapping"),
    (["--recipe", "{tmp}/gptq.json", "--method", "rtn"], "--method rtn conflicts with --recipe"),
    (["--recipe", "{tmp}"], "a folder must be a harpq checkpoint"),
    (["--save-recipe", "{tmp}/no/such/r.json"], "no folder"),
    (["--recipe", "{tmp}/bad_budget.json"], "harp_budget is a number of seconds"),
]


@pytest.mark.parametrize("extra,match", RECIPE_BAD, ids=[" ".join(a) for a, _ in RECIPE_BAD])
def test_bad_recipes_fail_in_one_line_before_any_work(tiny_path, tmp_path, extra, match):
    files = {"broken.json": '{"method": "rtn",', "broken.yaml": "method: [rtn", "list.json": "[1, 2]",
             "unknown_key.json": '{"method": "rtn", "colour": 1}', "bad_method.json": '{"method": "awq"}',
             "bad_layer.json": '{"method": "rtn", "layer": {"bits": 4.5}}', "gptq.json": '{"method": "gptq"}',
             "bad_budget.json": '{"method": "harp", "harp_budget": "soon"}'}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    res = invoke(["quantize", tiny_path, tmp_path / "q", *[a.format(tmp=tmp_path) for a in extra]])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("harpq: error:")]
    assert len(errors) == 1 and match in errors[0], res.output
    assert not (tmp_path / "q").exists()


def test_spread_windows_reach_both_ends_evenly():
    assert spread_windows(10, 4).tolist() == [0, 3, 6, 9]
    assert spread_windows(5, 9).tolist() == [0, 1, 2, 3, 4] and spread_windows(5, None).tolist() == [0, 1, 2, 3, 4]
    assert spread_windows(7, 1).tolist() == [0]
    picked = spread_windows(1141, 64).tolist()
    assert len(set(picked)) == 64 and picked[0] == 0 and picked[-1] == 1140


def test_perplexity_over_spread_windows_is_the_mean_over_exactly_those(tiny_path):
    import math

    import torch
    import torch.nn.functional as F

    model = harpq.load(tiny_path)
    tokens = torch.randint(0, model.config.vocab_size, (64 * 10 + 5,), generator=torch.Generator().manual_seed(0))
    nll = []
    with torch.no_grad():
        for i in (0, 3, 6, 9):
            w = tokens[i * 64:(i + 1) * 64][None]
            nll.append(F.cross_entropy(model(w).logits[0, :-1].float(), w[0, 1:], reduction="mean").item())
    want = math.exp(sum(nll) / len(nll))
    assert perplexity(model, tokens, 64, batch_size=3, progress=False, max_windows=4) == pytest.approx(want, rel=1e-5)
    full = perplexity(model, tokens, 64, progress=False)
    assert perplexity(model, tokens, 64, progress=False, max_windows=50) == full != pytest.approx(want, rel=1e-6)


def test_eval_prints_each_number_beside_the_fp_baseline_and_caches_it(tiny_gptq, tiny_path, small_text, cache,
                                                                        tmp_path, monkeypatch):
    import harpq.api as api

    calls = []
    one = api._evaluate_one
    monkeypatch.setattr(api, "_evaluate_one", lambda *a, **k: calls.append(a[0]) or one(*a, **k))
    args = ["eval", tiny_gptq, "--ppl", small_text, "--ctx", "64", "--max-windows", "5", "--json",
            tmp_path / "r.json"]
    res = invoke(args)
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "r.json").read_text())
    assert [str(c) for c in calls] == [str(tiny_gptq), str(tiny_path.resolve())]
    base = result["baseline"]
    assert base["model"] == str(tiny_path.resolve()) and base["bits_per_weight"] == 16.0 and not base["cached"]
    assert result["windows"]["gutenberg_small"][0] == 5 == base["windows"]["gutenberg_small"][0]
    direct = harpq.evaluate(tiny_path, [small_text], ctx=64, max_windows=5, progress=False)
    assert base["ppl"] == direct["ppl"]
    row = next(line for line in res.output.splitlines() if line.startswith("| gutenberg_small"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    total = result["windows"]["gutenberg_small"][1]
    assert cells == ["gutenberg_small", f"5/{total}", f"{result['ppl']['gutenberg_small']:.3f}",
                     f"{base['ppl']['gutenberg_small']:.3f}",
                     f"{100 * (result['ppl']['gutenberg_small'] / base['ppl']['gutenberg_small'] - 1):+.2f} %"]
    assert "FP baseline" in res.output and "evenly spread" in res.output
    calls.clear()
    again = invoke(args)
    assert again.exit_code == 0 and [str(c) for c in calls] == [str(tiny_gptq)] and "cached result" in again.output
    assert json.loads((tmp_path / "r.json").read_text())["baseline"]["ppl"] == base["ppl"]
    # another window count is another evaluation, not the cached one
    calls.clear()
    assert invoke([*args[:7], "3"]).exit_code == 0 and len(calls) == 2


def test_eval_says_why_there_is_no_baseline(tiny_path, tmp_path, small_text, cache):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_path, src)
    assert invoke(["quantize", src, tmp_path / "q", "--method", "rtn"]).exit_code == 0
    shutil.rmtree(src)
    res = invoke(["eval", tmp_path / "q", "--ppl", small_text, "--ctx", "64", "--max-windows", "2"])
    assert res.exit_code == 0
    assert f"baseline  none: the source model {src.resolve()} is not on this machine" in res.output
    res = invoke(["eval", tmp_path / "q", "--ppl", small_text, "--ctx", "64", "--max-windows", "2", "--baseline",
                  tiny_path])
    assert res.exit_code == 0 and f"baseline  {tiny_path}" in res.output and "FP baseline" in res.output
    res = invoke(["eval", tmp_path / "q", "--ppl", small_text, "--ctx", "64", "--max-windows", "2", "--baseline",
                  "none"])
    assert res.exit_code == 0 and "baseline" not in res.output
    res = invoke(["eval", tiny_path, "--ppl", small_text, "--ctx", "64", "--max-windows", "2"])
    assert res.exit_code == 0 and "it is its own baseline" in res.output and "| ppl " in res.output
    for bad, match in ((tmp_path / "nowhere", "model path not found"), (tmp_path / "q", "is the evaluated model")):
        res = invoke(["eval", tmp_path / "q", "--ppl", small_text, "--baseline", bad])
        assert res.exit_code == 2 and match in res.output


def test_eval_of_tasks_alone_prints_no_perplexity_and_finds_its_data_from_any_folder(tiny_path, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default task folder does not depend on the working directory
    res = invoke(["eval", tiny_path, "--tasks", "arc_easy", "--limit", "3", "--json", "r.json"])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "r.json").read_text())
    assert "ppl" not in result and "windows" not in result and result["tasks"]["arc_easy"]["n"] == 3
    assert "perplexity" not in res.output and "| text" not in res.output
    assert res.output.count("| arc_easy") == 2  # acc and acc_norm


def test_verbose_works_after_the_command_and_shows_module_results(tiny_path, tmp_path):
    res = invoke(["quantize", tiny_path, tmp_path / "q", "--method", "rtn", "-v"])
    assert res.exit_code == 0, res.output
    assert "harpq.pipeline.linear: model.layers.0.self_attn.q_proj: scalar 4-bit" in res.stderr
    quiet = invoke(["quantize", tiny_path, tmp_path / "q2", "--method", "rtn"])
    assert quiet.exit_code == 0 and "harpq.pipeline.linear" not in quiet.stderr
    assert logging.getLogger("harpq").level == logging.WARNING


def test_a_hub_id_is_told_to_be_missing_locally(capsys):
    from harpq.cli.main import main

    for argv in (["eval", "meta-llama/Llama-2-7b-hf", "--ppl", "x.txt"],
                 ["quantize", "Qwen/Qwen2.5-7B", "out", "--method", "rtn"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and "not found locally (no hub access" in err and err.count("\n") == 1


def test_tasks_dir_defaults_beside_the_checkout_or_from_the_environment(monkeypatch, tmp_path):
    from harpq.paths import default_tasks_dir

    assert default_tasks_dir().is_absolute() and default_tasks_dir() == TASKS_DIR.resolve()
    monkeypatch.setenv("HARPQ_TASKS_DIR", str(tmp_path))
    assert default_tasks_dir() == tmp_path
    monkeypatch.delenv("HARPQ_TASKS_DIR")
    monkeypatch.setenv("HARPQ_SHARED", str(tmp_path))
    assert default_tasks_dir() == tmp_path / "data" / "tasks"
