"""Nothing lost, nothing silent: what a run may never destroy, and how interrupted runs are recovered."""

import importlib
import json
import os
import shutil

import pytest
from click.testing import CliRunner

import harpq
from harpq import HarpqError, Recipe
from harpq.cli.main import cli
from harpq.io.checkpoint import MANIFEST, recover_stale, staging_dir


@pytest.fixture
def model(tmp_path, tiny_path):
    """A private copy of llama-tiny (tests may try to destroy it)."""
    d = tmp_path / "src" / "model"
    shutil.copytree(tiny_path, d)
    return d


def snapshot(d):
    return {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}


def rtn(src, out, **kw):
    return harpq.quantize(src, out, Recipe.preset("rtn", group_size=0), progress=False, **kw)


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_output_never_replaces_or_lands_in_the_model(model, where):
    before = snapshot(model)
    out = {"same": model, "parent": model.parent, "inside": model / "q"}[where]
    with pytest.raises(HarpqError, match="reads"):
        rtn(model, out, overwrite=True)
    assert snapshot(model) == before


def test_output_never_contains_the_working_directory(model, tmp_path, monkeypatch):
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out in (".", "..", str(work)):
        with pytest.raises(HarpqError, match="working directory"):
            rtn(model, out, overwrite=True)
    assert (work / "keep.txt").read_text() == "mine"


def test_output_never_holds_the_calibration_file(model, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    calib = out / "calib.txt"
    calib.write_text("hello world " * 2000)
    with pytest.raises(HarpqError, match="reads"):
        harpq.quantize(model, out, Recipe.preset("gptq", group_size=0), calib=calib, nsamples=2, seqlen=32,
                       overwrite=True, progress=False)
    assert calib.is_file()


def test_cli_overwrite_misuse_is_one_line_and_harmless(model):
    before = snapshot(model)
    result = CliRunner().invoke(cli, ["quantize", str(model), str(model), "--method", "rtn", "--group-size", "0",
                                      "--overwrite"])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "harpq: error:" in result.output
    assert snapshot(model) == before


def test_symlinked_output_is_refused(model, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(HarpqError, match="symbolic link"):
        rtn(model, tmp_path / "link", overwrite=True)


def test_overwrite_replaces_the_old_output_whole(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    rtn(model, out, overwrite=True)
    assert not (out / "old.txt").exists() and (out / MANIFEST).is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_failure_keeps_the_old_output(model, tmp_path):
    out = tmp_path / "out"
    rtn(model, out)
    before = snapshot(out)
    with pytest.raises(HarpqError):
        harpq.quantize(model, out, Recipe.preset("rtn", bits=7), overwrite=True, progress=False)
    assert snapshot(out) == before


def test_output_renamed_aside_by_a_killed_run_is_put_back(tmp_path):
    out = tmp_path / "out"
    aside = tmp_path / ".out.harpq-old-999999999"  # no such process
    aside.mkdir()
    (aside / "model.safetensors").write_text("weights")
    recover_stale(out)
    assert (out / "model.safetensors").read_text() == "weights" and not aside.exists()


def test_leftovers_of_dead_runs_are_cleaned(model, tmp_path):
    out = tmp_path / "out"
    stale = [tmp_path / ".out.harpq-partial-999999999", tmp_path / ".out.harpq-old-999999999"]
    out.mkdir()
    for d in stale:
        d.mkdir()
    rtn(model, out, overwrite=True)
    assert not any(d.exists() for d in stale)


def test_a_live_run_owning_the_output_is_not_disturbed(tmp_path):
    out = tmp_path / "out"
    partial = tmp_path / ".out.harpq-partial"
    partial.mkdir()
    (partial / "owner.pid").write_text(str(os.getppid()))  # a live process that is not this one
    with pytest.raises(HarpqError, match="another harpq run"):
        with staging_dir(out):
            pass
    assert partial.is_dir()


def test_keyboard_interrupt_keeps_a_resumable_run(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with staging_dir(out, resumable=True) as tmp:
            (tmp / "layer").write_text("done")
            raise KeyboardInterrupt
    assert (tmp_path / ".out.harpq-partial" / "layer").is_file() and not out.exists()
    with pytest.raises(RuntimeError):
        with staging_dir(out, resumable=True) as tmp:
            raise RuntimeError("bug")
    assert not (tmp_path / ".out.harpq-partial").exists()


def _gptq(src, out, **kw):
    from conftest import CALIB

    return harpq.quantize(src, out, Recipe.preset("gptq", bits=3, group_size=0), calib=CALIB, nsamples=4,
                          seqlen=64, progress=False, **kw)


def test_an_interrupted_run_resumes_where_it_stopped_bit_identically(model, tmp_path, monkeypatch, caplog):
    pipeline = importlib.import_module("harpq.pipeline.quantize")

    whole = _gptq(model, tmp_path / "whole")
    real = pipeline.quantize_linear
    calls = []

    def interrupted(name, *args, **kw):
        calls.append(name)
        if ".layers.1." in name:
            raise KeyboardInterrupt  # Ctrl-C in the second decoder layer
        return real(name, *args, **kw)

    out = tmp_path / "out"
    monkeypatch.setattr(pipeline, "quantize_linear", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _gptq(model, out)
    assert not out.exists() and (tmp_path / ".out.harpq-partial" / "resume" / "state.json").is_file()
    calls.clear()
    monkeypatch.setattr(pipeline, "quantize_linear", lambda name, *a, **k: calls.append(name) or real(name, *a, **k))
    with caplog.at_level("WARNING"):
        _gptq(model, out)
    assert "resuming: 1 decoder layers" in caplog.text
    assert calls and not any(".layers.0." in c for c in calls)  # the finished layer was not redone
    for name in ("model.safetensors", "config.json"):  # the manifest also hashes the log with its timings
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    log = [json.loads(line) for line in (out / "quant_log.jsonl").read_text().splitlines()]
    assert sorted(r["module"] for r in log) == sorted(json.loads(line)["module"] for line in
                                                      (whole / "quant_log.jsonl").read_text().splitlines())
    assert not (out / "resume").exists()


def test_a_changed_command_starts_fresh(model, tmp_path, monkeypatch, caplog):
    pipeline = importlib.import_module("harpq.pipeline.quantize")

    real = pipeline.quantize_linear

    def interrupted(name, *args, **kw):
        if ".layers.1." in name:
            raise KeyboardInterrupt
        return real(name, *args, **kw)

    out = tmp_path / "out"
    monkeypatch.setattr(pipeline, "quantize_linear", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _gptq(model, out)
    monkeypatch.setattr(pipeline, "quantize_linear", real)
    with caplog.at_level("WARNING"):
        harpq.quantize(model, out, Recipe.preset("gptq", bits=4, group_size=0), calib=__import__("conftest").CALIB,
                       nsamples=4, seqlen=64, progress=False)
    assert "starting fresh" in caplog.text and "resuming" not in caplog.text


def test_two_identical_runs_write_identical_files(model, tmp_path):
    a, b = _gptq(model, tmp_path / "a"), _gptq(model, tmp_path / "b")
    for name in ("model.safetensors", "config.json"):  # the manifest also hashes the log with its timings
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
