"""The Python API, mirroring the CLI: `quantize`, `load`, `evaluate`, `generate`."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import HarpqError
from .eval import bits_per_weight, evaluate_tasks, perplexity
from .eval.baseline import cached_baseline, resolve_baseline
from .eval.perplexity import window_count
from .eval.zeroshot import DEFAULT_TASKS_DIR, load_task
from .io.checkpoint import MANIFEST, verify_manifest
from .io.hf_integration import QUANT_METHOD, VERIFIED
from .io.model import engine_unsupported, load_model, load_tokenizer, read_config
from .io.text import read_text
from .pipeline import quantize, quantize_model
from .pipeline.calibration import tokenize_text
from .pipeline.quantize import resolve_device

log = logging.getLogger("harpq")
_SAID: set[str] = set()


def default_dtype(device: str) -> torch.dtype:
    return torch.float32 if torch.device(device).type == "cpu" else torch.float16


def load(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None, verify: bool = True) -> nn.Module:
    """Load a model directory, quantized by harpq or not. A harpq checkpoint is checked against its
    manifest first (set `verify=False` to skip hashing very large checkpoints)."""
    resolve_device(device)
    config = read_config(path)
    method = (config.get("quantization_config") or {}).get("quant_method")
    if (Path(path) / MANIFEST).is_file() and method != QUANT_METHOD:
        raise HarpqError(f"{path} is a harpq checkpoint whose config.json lost its harpq quantization_config "
                         f"(quant_method {method!r}): it was modified")
    if method == QUANT_METHOD:
        if verify:
            verify_manifest(path)
        VERIFIED.add(Path(path).resolve())
    try:
        return load_model(path, dtype=dtype or default_dtype(device), device=device)
    finally:
        VERIFIED.discard(Path(path).resolve())


def evaluate(
    model: str | Path | nn.Module,
    ppl: list[str | Path] | tuple[str | Path, ...] = (),
    ctx: int = 512,
    device: str = "cpu",
    tokenizer: Any = None,
    batch_size: int = 8,
    json_out: str | Path | None = None,
    progress: bool = True,
    dtype: torch.dtype | None = None,
    tasks: list[str] | tuple[str, ...] = (),
    tasks_dir: str | Path = DEFAULT_TASKS_DIR,
    limit: int | None = None,
    max_windows: int | None = None,
    baseline: str | Path | None = None,
) -> dict[str, Any]:
    """Perplexity on each text file and zero-shot tasks ->
    {"model", "ctx", "bits_per_weight", "ppl": {stem: value}, "windows": {stem: [used, of]},
    "tasks": {task: {"acc", ...}}, "baseline": {... the same for the FP model} or "baseline_note"}.

    `max_windows` evaluates that many windows of each text, evenly spread. `baseline` = "auto" evaluates
    the model a harpq checkpoint was quantized from the same way (cached), or a model path given."""
    if ctx < 2:
        raise HarpqError(f"context length must be at least 2, not {ctx}")
    if limit is not None and limit < 1:
        raise HarpqError(f"--limit must be at least 1, not {limit}")
    if batch_size < 1:
        raise HarpqError(f"batch size must be at least 1, not {batch_size}")
    if max_windows is not None and max_windows < 1:
        raise HarpqError(f"--max-windows must be at least 1, not {max_windows}")
    resolve_device(device)
    if json_out is not None:
        folder = Path(json_out).absolute().parent
        if not folder.is_dir():
            raise HarpqError(f"cannot write {json_out}: no folder {folder}")
        if not os.access(folder, os.W_OK):
            raise HarpqError(f"cannot write {json_out}: {folder} is not writable")
    for task in tasks:  # fail on a bad task name or missing file before loading the model
        load_task(task, tasks_dir, limit=1)
    if isinstance(model, nn.Module):
        if baseline not in (None, "none"):
            raise HarpqError("a baseline needs the model's directory, not an in-memory model")
        base_path, note = None, None
    else:
        limit_ctx = read_config(model).get("max_position_embeddings")
        if limit_ctx and ctx > limit_ctx:
            raise HarpqError(f"--ctx {ctx} is beyond the model's context of {limit_ctx} tokens")
        base_path, note = resolve_baseline(model, baseline)
    texts = {Path(f).stem: read_text(f) for f in ppl}  # read all first: a bad path fails before any work
    name = str(model) if not isinstance(model, nn.Module) else type(model).__name__
    dtype = dtype or default_dtype(device)
    settings = {"ctx": ctx, "max_windows": max_windows, "tasks": sorted(tasks), "limit": limit,
                "dtype": str(dtype).removeprefix("torch."), "device": torch.device(device).type}
    result: dict[str, Any] = {"model": name, **{k: v for k, v in settings.items() if k != "tasks"}}
    result.update(_evaluate_one(model, texts, tasks, tasks_dir, tokenizer, device, dtype, batch_size, progress,
                                ctx, limit, max_windows))
    if base_path is not None:
        def compute() -> dict[str, Any]:
            log.info("evaluating the FP baseline %s", base_path)
            return _evaluate_one(base_path, texts, tasks, tasks_dir, None, device, dtype, batch_size, progress,
                                 ctx, limit, max_windows)

        base, cached = cached_baseline(base_path, {**settings, "ppl": list(ppl)}, compute)
        if cached:
            log.info("FP baseline %s: cached result of the same evaluation", base_path)
        result["baseline"] = {"model": str(base_path), **base, "cached": cached}
    elif note is not None and baseline not in (None, "none"):
        result["baseline_note"] = note
    if json_out is not None:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _evaluate_one(model: str | Path | nn.Module, texts: dict[str, str], tasks, tasks_dir, tokenizer, device: str,
                  dtype: torch.dtype, batch_size: int, progress: bool, ctx: int, limit: int | None,
                  max_windows: int | None) -> dict[str, Any]:
    """bits per weight, perplexities (with the windows used) and task scores of one model."""
    if not isinstance(model, nn.Module):
        path, model = model, load(model, device=device, dtype=dtype)
        tokenizer = tokenizer or load_tokenizer(path)
    if tokenizer is None:
        raise HarpqError("evaluate() of an in-memory model needs its tokenizer")
    result: dict[str, Any] = {"bits_per_weight": round(bits_per_weight(model), 5)}
    if texts:
        result["ppl"], result["windows"] = {}, {}
        for stem, text in texts.items():
            tokens = tokenize_text(tokenizer, text)
            total = window_count(tokens.numel(), ctx)
            result["ppl"][stem] = perplexity(model, tokens, ctx, batch_size, progress, desc=stem,
                                             max_windows=max_windows)
            result["windows"][stem] = [min(total, max_windows or total), total]
            log.info("%s: perplexity %.3f over %d of %d windows of %d tokens", stem, result["ppl"][stem],
                     *result["windows"][stem], ctx)
    if tasks:
        result["tasks"] = evaluate_tasks(model, tokenizer, list(tasks), tasks_dir, limit, batch_size, progress)
    return result


@torch.no_grad()
def generate(model: str | Path | nn.Module, prompt: str, max_new_tokens: int = 64, device: str = "cpu",
             tokenizer: Any = None, engine: bool | None = None) -> str:
    """Greedy continuation of `prompt`. On CUDA (or with `engine=True`) through harpq's decoder with a
    static KV cache and a CUDA-graph step; elsewhere through Hugging Face `generate`."""
    if not isinstance(model, nn.Module):
        path, model = model, load(model, device=device)
        tokenizer = tokenizer or load_tokenizer(path)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    use_engine = engine if engine is not None else ids.is_cuda
    why = engine_unsupported(model.config) if use_engine else None
    if why:
        if why not in _SAID:
            _SAID.add(why)
            log.warning("harpq's decode engine cannot run this model (%s): generating with Hugging Face", why)
        use_engine = False
    if use_engine:
        from .engine import DecodeRunner, from_hf

        runner = DecodeRunner(from_hf(model), 1, ids.shape[1] + max_new_tokens + 1)
        new = runner.generate(ids, max_new_tokens)[0].tolist()
        eos = tokenizer.eos_token_id
        if eos in new:  # stop where `generate` would
            new = new[:new.index(eos) + 1]
    else:
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        new = out[0, ids.shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True)


__all__ = ["evaluate", "generate", "load", "quantize", "quantize_model"]
