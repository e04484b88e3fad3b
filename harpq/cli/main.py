"""`harpq quantize | eval | generate`: the command line over the Python API."""

from __future__ import annotations

import logging
import sys
import time

import click
import torch

from ..errors import HarpqError
from ..eval.zeroshot import DEFAULT_TASKS_DIR, TASKS
from ..recipe import METHODS, Recipe


def _fail(message: str) -> None:
    click.echo(f"harpq: error: {message}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="harpq")
@click.option("-v", "--verbose", is_flag=True, help="Log details (damping retries, timings).")
@click.option("--debug", is_flag=True, help="Show the traceback of an unexpected error.")
def cli(verbose: bool, debug: bool) -> None:
    """Quantize Hugging Face causal LMs to 2-4 bits, evaluate them and run them."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")


@cli.command()
@click.argument("model")
@click.argument("out")
@click.option("--method", type=click.Choice(sorted(METHODS)), default="gptq", show_default=True)
@click.option("--bits", type=int, default=None, help="[default: 4; quipsharp, harp: 2]")
@click.option("--group-size", type=int, default=None, help="0: one group per row. [default: 128; hqq: 64; quip: 0]")
@click.option("--ragged-groups", is_flag=True,
              help="Let the last group of a row be shorter where the group size does not divide in_features.")
@click.option("--processor", type=click.Choice(["none", "kron", "rht", "harp"]), default=None,
              help="Override the method's incoherence processor.")
@click.option("--codebook", type=click.Choice(["scalar", "e8p", "hqq"]), default=None,
              help="Override the method's codebook (hqq: scalar grid with HQQ's zero-point solver).")
@click.option("--rounding", type=click.Choice(["nearest", "ldlq"]), default=None,
              help="Override the method's rounding.")
@click.option("--scale", "scale_rule", type=click.Choice(["minmax", "rms"]), default=None,
              help="Scalar grid: per-group min-max (default) or QuIP's ±2.4·RMS per matrix.")
@click.option("--tune-passes", type=int, default=0, show_default=True,
              help="LDLQ: block coordinate descent passes after rounding (QuIP#'s tune iterations).")
@click.option("--scale-sweep", is_flag=True, help="e8p: choose the codebook scale per model on the proxy loss.")
@click.option("--act-order", is_flag=True, help="LDLQ: round columns in order of decreasing Hessian diagonal.")
@click.option("--damp", type=float, default=0.01, show_default=True, help="LDLQ: relative Hessian damping.")
@click.option("--harp-steps", type=int, default=None, help="HARP: Adam steps per module. [default: 1200]")
@click.option("--harp-schedule", type=click.Choice(["greedy", "kron"]), default=None,
              help="HARP: mixed-radix stages over all of n (greedy), or over 2^j of n = K·2^j times the fixed "
                   "H_K (kron: starts exactly at the RHT). [default: greedy]")
@click.option("--harp-store", type=click.Choice(["fp16", "int8"]), default=None,
              help="HARP: storage of the learned parameters (int8: one fp16 scale per block). [default: fp16]")
@click.option("--calib", type=click.Path(), default=None, help="Calibration text (.txt or .jsonl with a text field).")
@click.option("--nsamples", type=int, default=128, show_default=True)
@click.option("--seqlen", type=int, default=512, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda: where each decoder layer is quantized.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--format", "out_format", type=click.Choice(["harpq", "compressed-tensors", "gptq"]), default="harpq",
              show_default=True, help="Write OUT as harpq checkpoint, or in a format vLLM serves (see `export`).")
def quantize(model, out, method, bits, group_size, ragged_groups, processor, codebook, rounding, scale_rule,
             tune_passes, scale_sweep, act_order, damp, harp_steps, harp_schedule, harp_store, calib, nsamples, seqlen,
             device, seed, overwrite, out_format) -> None:
    """Quantize MODEL (a Hugging Face model directory) into the new directory OUT."""
    from ..api import quantize as run

    try:
        recipe = Recipe.preset(method, bits=bits, group_size=group_size, ragged_groups=ragged_groups,
                               processor=processor, codebook=codebook, rounding=rounding, scale=scale_rule,
                               act_order=act_order, damp=damp, seed=seed, tune_passes=tune_passes,
                               scale_sweep=scale_sweep, harp_steps=harp_steps, harp_schedule=harp_schedule,
                               harp_store=harp_store)
        start = time.perf_counter()
        if out_format == "harpq":
            path = run(model, out, recipe, calib=calib, nsamples=nsamples, seqlen=seqlen, device=device,
                       seed=seed, overwrite=overwrite)
        else:
            path = _quantize_then_export(run, model, out, recipe, out_format, overwrite, calib=calib,
                                         nsamples=nsamples, seqlen=seqlen, device=device, seed=seed)
    except HarpqError as e:
        _fail(str(e))
    click.echo(f"wrote {path} in {time.perf_counter() - start:.1f} s")


def _quantize_then_export(run, model, out, recipe, out_format, overwrite, **kwargs):
    """Quantize into a harpq checkpoint beside OUT, then export it as OUT (the checkpoint is removed)."""
    import shutil
    from pathlib import Path

    from ..io.checkpoint import check_output
    from ..io.export import export

    out = Path(out)
    check_output(out, overwrite, [model])
    middle = out.parent / f".{out.name}.harpq-checkpoint"
    shutil.rmtree(middle, ignore_errors=True)
    try:
        run(model, middle, recipe, **kwargs)
        return export(middle, out, out_format, overwrite=overwrite)
    finally:
        shutil.rmtree(middle, ignore_errors=True)


@cli.command("export")
@click.argument("model")
@click.argument("out")
@click.option("--format", "out_format", type=click.Choice(["compressed-tensors", "gptq"]), required=True,
              help="compressed-tensors (vLLM, llm-compressor) or gptq (GPTQModel, vLLM).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def export_cmd(model, out, out_format, overwrite) -> None:
    """Write the harpq checkpoint MODEL in a format vLLM serves, exactly, or refuse and say why."""
    from ..io.export import export

    path = export(model, out, out_format, overwrite=overwrite)
    click.echo(f"wrote {path} ({out_format})")


@cli.command("eval")
@click.argument("model")
@click.option("--ppl", "ppl_files", multiple=True, type=click.Path(), help="Text file (repeatable).")
@click.option("--tasks", default=None, help=f"Comma-separated zero-shot tasks ({','.join(TASKS)}).")
@click.option("--tasks-dir", type=click.Path(), default=str(DEFAULT_TASKS_DIR), show_default=True)
@click.option("--limit", type=int, default=None, help="Score only the first N items of each task.")
@click.option("--ctx", type=int, default=512, show_default=True, help="Context length of each window.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Compute dtype [default: float32 on cpu, float16 on cuda].")
@click.option("--json", "json_out", type=click.Path(), default=None, help="Write the results as JSON here.")
def evaluate(model, ppl_files, tasks, tasks_dir, limit, ctx, device, batch_size, dtype, json_out) -> None:
    """Perplexity of MODEL on each --ppl file (non-overlapping windows of --ctx tokens) and zero-shot --tasks."""
    from ..api import evaluate as run

    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else []
    if not ppl_files and not task_list:
        _fail("nothing to evaluate: pass --ppl FILE and/or --tasks " + ",".join(TASKS))
    try:
        result = run(model, ppl_files, ctx=ctx, device=device, batch_size=batch_size, json_out=json_out,
                     dtype=getattr(torch, dtype) if dtype else None, tasks=task_list, tasks_dir=tasks_dir,
                     limit=limit)
    except HarpqError as e:
        _fail(str(e))
    click.echo(f"{'text':<24} {'ctx':>6} {'ppl':>10}   bits/weight {result['bits_per_weight']:.3f}")
    for stem, value in result["ppl"].items():
        click.echo(f"{stem:<24} {ctx:>6} {value:>10.3f}")
    for task, r in result.get("tasks", {}).items():
        scores = "  ".join(f"{k} {v:.4f}" for k, v in r.items() if k != "n")
        click.echo(f"{task:<24} n={r['n']:<6} {scores}")
    if json_out:
        click.echo(f"wrote {json_out}")


@cli.command()
@click.argument("model")
@click.argument("out")
@click.option("--methods", default="rtn,gptq,quip,quipsharp,hqq,harp", show_default=True)
@click.option("--bits", "bits_list", default="2,3,4", show_default=True)
@click.option("--ppl", "ppl_files", multiple=True, required=True, type=click.Path(), help="Text file (repeatable).")
@click.option("--calib", type=click.Path(), default=None, help="Calibration text for the methods that need it.")
@click.option("--tasks", default=None, help=f"Comma-separated zero-shot tasks ({','.join(TASKS)}).")
@click.option("--tasks-dir", type=click.Path(), default=str(DEFAULT_TASKS_DIR), show_default=True)
@click.option("--limit", type=int, default=None, help="Score only the first N items of each task.")
@click.option("--ctx", type=int, default=512, show_default=True)
@click.option("--nsamples", type=int, default=128, show_default=True)
@click.option("--seqlen", type=int, default=512, show_default=True)
@click.option("--harp-steps", type=int, default=None, help="HARP: Adam steps per module. [default: 1200]")
@click.option("--device", default="cpu", show_default=True)
def compare(model, out, methods, bits_list, ppl_files, calib, tasks, tasks_dir, limit, ctx, nsamples, seqlen,
            harp_steps, device) -> None:
    """Quantize MODEL with each method and bit width, evaluate each, write OUT/report.md (resumable)."""
    from ..eval.compare import compare as run

    settings = {"harp": {"harp_steps": harp_steps}} if harp_steps is not None else {}
    try:
        path = run(model, out, [m.strip() for m in methods.split(",") if m.strip()],
                   [int(b) for b in bits_list.split(",") if b.strip()], list(ppl_files), calib=calib,
                   tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks else [], tasks_dir=tasks_dir,
                   limit=limit, ctx=ctx, nsamples=nsamples, seqlen=seqlen, device=device, settings=settings,
                   echo=click.echo)
    except (HarpqError, ValueError) as e:
        _fail(str(e))
    click.echo(f"wrote {path}")


@cli.command()
@click.argument("model")
@click.argument("prompt")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--device", default="cpu", show_default=True)
def generate(model, prompt, max_new_tokens, device) -> None:
    """Greedy continuation of PROMPT by MODEL (on CUDA: static KV cache, CUDA-graph decode)."""
    from ..api import generate as run

    if not prompt.strip():
        _fail("the prompt is empty")
    if max_new_tokens < 1:
        _fail(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
    try:
        click.echo(prompt + run(model, prompt, max_new_tokens=max_new_tokens, device=device))
    except HarpqError as e:
        _fail(str(e))


@cli.command()
@click.option("--shape", default="llama-2-7b", show_default=True, help="llama-2-7b, llama-3-8b or llama-2-70b.")
@click.option("--formats", default="fp16,rtn4,rtn2,hqq4,hqq2,quipsharp2,quipsharp3,quipsharp4,harp2,harp3,harp4",
              show_default=True)
@click.option("--batch", "batches", default="1,4,16", show_default=True, help="Comma-separated batch sizes.")
@click.option("--steps", type=int, default=64, show_default=True, help="Decode steps per timed run.")
@click.option("--json", "json_out", type=click.Path(), default=None, help="Write the results as JSON here.")
def bench(shape, formats, batches, steps, json_out) -> None:
    """Decode tok/s of a SHAPE model with random weights on the GPU: FP16 and each format, one run."""
    if not torch.cuda.is_available():
        _fail("harpq bench times the CUDA decode path: no CUDA device here")
    from ..engine import bench as b

    try:
        result = b.run(shape, [f.strip() for f in formats.split(",") if f.strip()],
                       [int(x) for x in batches.split(",") if x.strip()], steps=steps, echo=click.echo,
                       json_path=json_out)
    except (HarpqError, ValueError) as e:
        _fail(str(e))
    click.echo(b.table(result))


def _os_message(e: OSError) -> str:
    """An operating-system failure in one line: what, and on which file."""
    import errno

    what = {errno.ENOSPC: "no space left on the device", errno.EACCES: "permission denied",
            errno.EROFS: "read-only file system", errno.ENOENT: "no such file or directory"}.get(e.errno)
    where = f": {e.filename}" if getattr(e, "filename", None) else ""
    return f"{what or e.strerror or type(e).__name__}{where}"


def main(argv: list[str] | None = None) -> None:
    """Every failure a user can cause ends in one line `harpq: error: ...` and exit status 2; anything
    else is a bug, reported in one line with a pointer to --debug for the traceback (exit status 1)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        cli.main(args=args, prog_name="harpq", standalone_mode=False)
    except click.exceptions.Exit as e:  # --help, --version
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("harpq: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        _fail(e.format_message().replace("\n", " "))
    except HarpqError as e:
        _fail(str(e))
    except OSError as e:
        _fail(_os_message(e))
    except (MemoryError, torch.cuda.OutOfMemoryError):
        _fail("out of memory: try fewer --nsamples, a shorter --seqlen or --ctx, or a smaller --batch-size")
    except Exception as e:  # noqa: BLE001 - the last resort: one line, and the way to the traceback
        if "--debug" in args:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        click.echo(f"harpq: internal error: {type(e).__name__}: {first} (a bug; rerun with --debug for the "
                   "traceback)", err=True)
        sys.exit(1)


__all__ = ["cli", "main"]
