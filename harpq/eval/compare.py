"""`harpq compare`: quantize one model with several methods and bit widths, evaluate each, write a report.

Every (method, bits) run ends in its own JSON file under OUT/runs/, written only when the run is
complete, so an interrupted comparison resumes where it stopped: finished runs are read, not redone, as
long as they were made from the same model, text files and settings (a record holds that key).
Each quantized model stays under OUT/models/ (unless `keep_models=False`). The report (OUT/report.md and
its PNG plots) is rebuilt from those files at the end, and its table is returned for the terminal.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import HarpqError
from ..recipe import METHODS, Recipe
from .zeroshot import DEFAULT_TASKS_DIR, load_task


def run_name(method: str, bits: int) -> str:
    return f"{method}-{bits}bit"


def check_plan(methods: list[str], bits: list[int], tasks: list[str], tasks_dir: str | Path) -> None:
    """Fail on any bad method, bit width or task before the first (long) run starts."""
    for method in methods:
        if method not in METHODS:
            raise HarpqError(f"unknown method {method!r} (offered: {', '.join(METHODS)})")
    for b in bits:
        if b not in (2, 3, 4):
            raise HarpqError(f"compare covers 2, 3 and 4 bits, not {b}")
    for task in tasks:
        load_task(task, tasks_dir, limit=1)


def compare(
    model: str | Path, out: str | Path, methods: list[str], bits: list[int], ppl: list[str | Path],
    calib: str | Path | None = None, tasks: list[str] | None = None, tasks_dir: str | Path = DEFAULT_TASKS_DIR,
    limit: int | None = None, ctx: int = 512, nsamples: int = 128, seqlen: int = 512, device: str = "cpu",
    settings: dict[str, Any] | None = None, echo: Callable[[str], None] = print, progress: bool = True,
    max_windows: int | None = None, keep_models: bool = True,
) -> tuple[Path, str]:
    """Run every (method, bits) missing under OUT/runs, then write OUT/report.md; returns its path and the
    Markdown table of all runs."""
    from ..api import evaluate, quantize

    tasks = list(tasks or [])
    check_plan(methods, bits, tasks, tasks_dir)
    out = Path(out)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    plan = [("fp", 16)] + [(m, b) for b in bits for m in methods]
    from ..pipeline.resume import file_digest, model_digest

    key = {"model": model_digest(model), "ppl": sorted(file_digest(f) for f in ppl), "ctx": ctx, "limit": limit,
           "tasks": sorted(tasks), "calib": file_digest(calib) if calib else None, "nsamples": nsamples,
           "seqlen": seqlen, "settings": settings or {}, "max_windows": max_windows}
    key = json.loads(json.dumps(key, default=str))
    for i, (method, b) in enumerate(plan, 1):
        name = "fp" if method == "fp" else run_name(method, b)
        done = runs / f"{name}.json"
        if done.exists():
            try:
                same = json.loads(done.read_text()).get("key") == key
            except ValueError:
                same = False
            if same:
                echo(f"[{i}/{len(plan)}] {name}: done before with these settings, kept")
                continue
            echo(f"[{i}/{len(plan)}] {name}: done before with other model, files or settings: redone")
        echo(f"[{i}/{len(plan)}] {name}: " + ("evaluating the FP model" if method == "fp" else "quantizing"))
        start = time.perf_counter()
        record: dict[str, Any] = {"method": method, "bits": b, "key": key}
        if method == "fp":
            target = model
        else:
            target = out / "models" / name
            if target.exists():
                shutil.rmtree(target)  # made by an interrupted run, or with other settings
            recipe = Recipe.preset(method, bits=b, ragged_groups=True, **(settings or {}).get(method, {}))
            quantize(model, target, recipe, calib=calib if recipe.layer.needs_hessian else None,
                     nsamples=nsamples, seqlen=seqlen, device=device, progress=progress)
            record["quant_seconds"] = round(time.perf_counter() - start, 1)
            log = [json.loads(line) for line in (target / "quant_log.jsonl").read_text().splitlines()]
            record["proxy_loss"] = {e["module"]: e["proxy_loss"] for e in log}
            echo(f"[{i}/{len(plan)}] {name}: quantized in {record['quant_seconds']:.0f} s, evaluating")
        result = evaluate(target, ppl, ctx=ctx, device=device, tasks=tasks, tasks_dir=tasks_dir, limit=limit,
                          progress=progress, max_windows=max_windows)
        record.update(bits_per_weight=result["bits_per_weight"], ppl=result.get("ppl", {}),
                      windows=result.get("windows", {}), tasks=result.get("tasks", {}), ctx=ctx, limit=limit,
                      seconds=round(time.perf_counter() - start, 1))
        if method != "fp" and keep_models:
            record["path"] = str(target)
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(done)
        if method != "fp" and not keep_models:
            shutil.rmtree(target)
        echo(f"[{i}/{len(plan)}] {name}: {summary(record)}")
    from .report import results_table, write_report

    records = [r for r in (json.loads(p.read_text()) for p in sorted(runs.glob("*.json"))) if r.get("key") == key]
    return write_report(out, records, model=str(model)), results_table(records)  # other settings' runs stay out


def summary(record: dict[str, Any]) -> str:
    """One line of a finished run: perplexities, bits per weight, tasks, time."""
    parts = [f"ppl {stem} {value:.3f}" for stem, value in record["ppl"].items()]
    parts.append(f"{record['bits_per_weight']:.3f} bits/weight")
    parts += [f"{task} acc {r['acc']:.3f}" for task, r in record.get("tasks", {}).items() if "acc" in r]
    parts.append(f"{record['seconds']:.0f} s")
    return ", ".join(parts)


def layer_medians(proxy: dict[str, float | None]) -> dict[int, float]:
    """Median proxy loss of each decoder layer's modules (modules named `...layers.<i>....`)."""
    by_layer: dict[int, list[float]] = {}
    for module, loss in proxy.items():
        parts = module.split(".")
        if loss is None or "layers" not in parts:
            continue
        by_layer.setdefault(int(parts[parts.index("layers") + 1]), []).append(loss)
    return {k: statistics.median(v) for k, v in sorted(by_layer.items())}
