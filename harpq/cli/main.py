"""`harpq quantize | eval | compare | methods | export | generate | bench`: the command line over the API.

Nothing heavy is imported at start-up (torch, transformers load inside the commands), so `--help` and
`harpq methods` answer at once.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from ..errors import HarpqError
from ..markdown import markdown_table
from ..paths import DEFAULT_TASKS_DIR, TASKS
from ..recipe import CALIBRATION_KEYS, METHODS, Recipe, check_pattern, method_table, parse_override


def _fail(message: str) -> None:
    click.echo(f"harpq: error: {message}", err=True)
    sys.exit(2)


class _Stderr(logging.Handler):
    """Log lines to the current stderr (looked up per record, so a redirected stderr gets them)."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(self.format(record) + "\n")


def _set_logging(verbose: bool) -> None:
    logger = logging.getLogger("harpq")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)


def _verbose_option(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        _set_logging(True)


def common(f):
    """-v and --debug on every command too, where users type them (`harpq eval ... -v`)."""
    f = click.option("-v", "--verbose", is_flag=True, expose_value=False, callback=_verbose_option,
                     help="Log details (per-module results, timings, cache use).")(f)
    return click.option("--debug", is_flag=True, expose_value=False,
                        help="Show the traceback of an unexpected error.")(f)


class _Group(click.Group):
    """Any HarpqError a command raises ends as one line `harpq: error: ...` and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HarpqError as e:
            _fail(str(e))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="harpq")
@click.option("-v", "--verbose", is_flag=True, help="Log details (per-module results, timings, cache use).")
@click.option("--debug", is_flag=True, help="Show the traceback of an unexpected error.")
def cli(verbose: bool, debug: bool) -> None:
    """Quantize Hugging Face causal LMs to 2-4 bits, evaluate them and run them."""
    _set_logging(verbose)


def _explicit(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


#: command-line options that set a field of the layer recipe
LAYER_OPTIONS = {"bits": "bits", "group_size": "group_size", "ragged_groups": "ragged_groups",
                 "processor": "processor", "codebook": "codebook", "rounding": "rounding", "scale_rule": "scale",
                 "tune_passes": "tune_passes", "act_order": "act_order", "damp": "damp", "harp_steps": "harp_steps",
                 "harp_schedule": "harp_schedule", "harp_store": "harp_store", "harp_refresh": "harp_refresh",
                 "seed": "seed"}


def read_recipe_file(path: str) -> tuple[Recipe, dict[str, Any]]:
    """A recipe file (.json, .yaml/.yml) or a harpq checkpoint's recorded recipe -> (recipe, calibration)."""
    from ..recipe import recipe_from_file_dict

    p = Path(path)
    if p.is_dir():
        try:
            qc = json.loads((p / "config.json").read_text()).get("quantization_config") or {}
        except (OSError, ValueError):
            qc = {}
        if qc.get("quant_method") != "harpq" or "recipe" not in qc:
            raise HarpqError(f"--recipe {path}: a folder must be a harpq checkpoint (its config.json records the "
                             "recipe)")
        calibration = {k: v for k, v in (qc.get("calibration") or {}).items() if k in CALIBRATION_KEYS}
        return recipe_from_file_dict({**qc["recipe"], "calibration": calibration}, f"--recipe {path}")
    if not p.is_file():
        raise HarpqError(f"recipe file not found: {path}")
    text = p.read_text(encoding="utf-8", errors="replace")
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            content = yaml.safe_load(text)
        else:
            content = json.loads(text)
    except ValueError as e:  # JSONDecodeError and yaml.YAMLError's parse errors
        raise HarpqError(f"recipe file {path} does not parse: {str(e).splitlines()[0]}") from None
    except Exception as e:  # noqa: BLE001 - yaml's own error types
        raise HarpqError(f"recipe file {path} does not parse: {str(e).splitlines()[0]}") from None
    return recipe_from_file_dict(content, f"recipe file {path}")


def write_recipe_file(path: str, content: dict[str, Any]) -> None:
    p = Path(path)
    if not p.absolute().parent.is_dir():
        raise HarpqError(f"cannot write {path}: no folder {p.absolute().parent}")
    if p.suffix in (".yaml", ".yml"):
        import yaml

        text = yaml.safe_dump(content, sort_keys=False)
    else:
        text = json.dumps(content, indent=2) + "\n"
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(text)
    tmp.replace(p)


def build_recipe(ctx: click.Context, params: dict[str, Any]) -> tuple[Recipe, dict[str, Any]]:
    """The run's recipe and calibration settings: the method's preset (or --recipe FILE), then every option
    given on the command line, then --ignore and --override."""
    if params["recipe_file"]:
        recipe, calibration = read_recipe_file(params["recipe_file"])
        if _explicit(ctx, "method") and params["method"] != recipe.method:
            raise HarpqError(f"--method {params['method']} conflicts with --recipe {params['recipe_file']} "
                             f"(method {recipe.method}): drop one")
    else:
        recipe, calibration = Recipe.preset(params["method"]), {}
    changes = {field: params[opt] for opt, field in LAYER_OPTIONS.items()
               if _explicit(ctx, opt) and params[opt] is not None}
    recipe.layer = replace(recipe.layer, **changes)
    if _explicit(ctx, "scale_sweep"):
        recipe.scale_sweep = params["scale_sweep"]
    if params.get("harp_budget") is not None:
        recipe.harp_budget = params["harp_budget"]
    recipe.ignore += [check_pattern(p, f"--ignore {p!r}") for p in params["ignore"]]
    recipe.overrides += [parse_override(text) for text in params["override"]]
    defaults = {"calib": None, "nsamples": 128, "seqlen": 512, "seed": 0}
    calibration = {k: params[k] if _explicit(ctx, k) else calibration.get(k, defaults[k]) for k in CALIBRATION_KEYS}
    return recipe, calibration


@cli.command()
@click.argument("model")
@click.argument("out", required=False)
@click.option("--method", type=click.Choice(list(METHODS)), default="gptq", show_default=True,
              help="See `harpq methods`.")
@click.option("--recipe", "recipe_file", type=click.Path(), default=None,
              help="Start from a recipe file (.json/.yaml, as --save-recipe writes) or a harpq checkpoint's recipe; "
                   "options given here change it.")
@click.option("--save-recipe", type=click.Path(), default=None,
              help="Write the full recipe and calibration settings of this run (.json or .yaml).")
@click.option("--dry-run", is_flag=True, help="Check and print the recipe, write --save-recipe, quantize nothing.")
@click.option("--bits", type=int, default=None, help="[default: 4; quipsharp, harp, qtip: 2]")
@click.option("--group-size", type=int, default=None, help="0: one group per row. [default: 128; hqq: 64; quip: 0]")
@click.option("--ragged-groups/--no-ragged-groups", default=None,
              help="Let the last group of a row be shorter where the group size does not divide in_features (off: "
                   "refuse such a group size; vLLM's formats need it to divide). [default: on]")
@click.option("--ignore", multiple=True, metavar="REGEX",
              help="Leave modules whose full name matches unquantized (re.search; repeatable; lm_head always).")
@click.option("--override", multiple=True, metavar="REGEX:KEY=VALUE[,...]",
              help="Other settings for modules matching REGEX, e.g. 'mlp\\.down_proj:bits=4,group_size=64' "
                   "(repeatable; later ones win).")
@click.option("--processor", type=click.Choice(["none", "kron", "rht", "rht-block", "harp"]), default=None,
              help="Override the method's incoherence processor.")
@click.option("--codebook", type=click.Choice(["scalar", "e8p", "hqq", "qtip"]), default=None,
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
@click.option("--harp-steps", type=int, default=None, help="HARP: Adam steps per module. [default: 40]")
@click.option("--harp-refresh", type=click.IntRange(min=1), default=None, metavar="K",
              help="HARP: search the codebook for the fit's target every K steps (the search dominates a step; "
                   "between searches the last target stands in). [default: 1]")
@click.option("--harp-budget", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="HARP: seconds of fitting for the whole run, shared by its HARP linears (each fit stops "
                   "when its share is spent, keeping its best iterate, never worse than the RHT start).")
@click.option("--harp-schedule", type=click.Choice(["greedy", "kron", "block"]), default=None,
              help="HARP: mixed-radix stages over all of n (greedy), over 2^j of n = K·2^j times the fixed "
                   "H_K (kron: starts exactly at the RHT), or inside runs of 128 (block: starts exactly at "
                   "rht-block). [default: kron]")
@click.option("--harp-store", type=click.Choice(["fp16", "int8"]), default=None,
              help="HARP: storage of the learned parameters (int8: one fp16 scale per block). [default: int8]")
@click.option("--calib", type=click.Path(), default=None, help="Calibration text (.txt or .jsonl with a text field).")
@click.option("--nsamples", type=int, default=128, show_default=True, help="Calibration windows.")
@click.option("--seqlen", type=int, default=512, show_default=True, help="Tokens per calibration window.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda: where each decoder layer is quantized.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--format", "out_format", type=click.Choice(["harpq", "compressed-tensors", "gptq"]), default="harpq",
              show_default=True, help="Write OUT as harpq checkpoint, or in a format vLLM serves (see `export`).")
@common
@click.pass_context
def quantize(ctx: click.Context, model: str, out: str | None, **params: Any) -> None:
    """Quantize MODEL (a Hugging Face model directory) into the new directory OUT."""
    recipe, calibration = build_recipe(ctx, params)
    from ..pipeline.linear import check_recipe
    from ..recipe import recipe_file_dict

    check_recipe(recipe)
    content = recipe_file_dict(recipe, calibration)
    if params["save_recipe"]:
        write_recipe_file(params["save_recipe"], content)
        click.echo(f"wrote {params['save_recipe']}")
    if params["dry_run"]:
        click.echo(json.dumps(content, indent=2))
        return
    if out is None:
        _fail("missing OUT: the directory to write the quantized model to")
    from ..api import quantize as run

    kwargs = {"calib": calibration["calib"], "nsamples": calibration["nsamples"], "seqlen": calibration["seqlen"],
              "seed": calibration["seed"], "device": params["device"]}
    start = time.perf_counter()
    if params["out_format"] == "harpq":
        path = run(model, out, recipe, overwrite=params["overwrite"], **kwargs)
    else:
        path = _quantize_then_export(run, model, out, recipe, params["out_format"], params["overwrite"], **kwargs)
    click.echo(f"wrote {path} in {time.perf_counter() - start:.1f} s")


def _quantize_then_export(run, model, out, recipe, out_format, overwrite, **kwargs):
    """Quantize into a harpq checkpoint beside OUT, then export it as OUT (the checkpoint is removed)."""
    import shutil

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


@cli.command("methods")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per method instead of the table.")
@common
def methods_cmd(as_json: bool) -> None:
    """Each method: its parts, default bits and group size, whether it needs calibration text, its CPU time."""
    rows = method_table()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(markdown_table(list(rows[0]), [[str(v) for v in r.values()] for r in rows]))
    click.echo("\nCPU time: llama-small (30M parameters) on 2 cores, 128 calibration windows. Any part can be "
               "swapped: --processor, --codebook, --rounding, --scale; per module: --override, --ignore.")


@cli.command("export")
@click.argument("model")
@click.argument("out")
@click.option("--format", "out_format", type=click.Choice(["compressed-tensors", "gptq"]), required=True,
              help="compressed-tensors (vLLM, llm-compressor) or gptq (GPTQModel, vLLM).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@common
def export_cmd(model, out, out_format, overwrite) -> None:
    """Write the harpq checkpoint MODEL in a format vLLM serves, exactly, or refuse and say why."""
    from ..io.export import export

    path = export(model, out, out_format, overwrite=overwrite)
    click.echo(f"wrote {path} ({out_format})")


@cli.command("eval")
@click.argument("model")
@click.option("--ppl", "ppl_files", multiple=True, type=click.Path(), help="Text file (repeatable).")
@click.option("--max-windows", type=int, default=None,
              help="Perplexity over N windows spread evenly over each text (a quick estimate; the output says so). "
                   "[default: all]")
@click.option("--tasks", default=None, help=f"Comma-separated zero-shot tasks ({','.join(TASKS)}).")
@click.option("--tasks-dir", type=click.Path(), default=str(DEFAULT_TASKS_DIR), show_default=True,
              help="Folder of the task files (or set HARPQ_TASKS_DIR).")
@click.option("--limit", type=int, default=None, help="Score only the first N items of each task.")
@click.option("--baseline", default="auto", show_default=True,
              help="FP model evaluated the same way beside a quantized one: auto (the model it was quantized from, "
                   "cached), none, or a model directory.")
@click.option("--ctx", type=int, default=512, show_default=True, help="Context length of each window.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Compute dtype [default: float32 on cpu, float16 on cuda].")
@click.option("--json", "json_out", type=click.Path(), default=None, help="Write the results as JSON here.")
@common
def evaluate(model, ppl_files, max_windows, tasks, tasks_dir, limit, baseline, ctx, device, batch_size, dtype,
             json_out) -> None:
    """Perplexity of MODEL on each --ppl file (non-overlapping windows of --ctx tokens) and zero-shot --tasks,
    beside the FP model it was quantized from."""
    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else []
    if not ppl_files and not task_list:
        _fail("nothing to evaluate: pass --ppl FILE and/or --tasks " + ",".join(TASKS))
    import torch

    from ..api import evaluate as run

    start = time.perf_counter()
    result = run(model, ppl_files, ctx=ctx, device=device, batch_size=batch_size, json_out=json_out,
                 dtype=getattr(torch, dtype) if dtype else None, tasks=task_list, tasks_dir=tasks_dir, limit=limit,
                 max_windows=max_windows, baseline=baseline)
    click.echo("\n".join(eval_lines(result)))
    click.echo(f"evaluated in {time.perf_counter() - start:.1f} s" + (f"; wrote {json_out}" if json_out else ""))


def _bits(value: float) -> str:
    return "FP, 16 bits/weight" if value == 16.0 else f"{value:.3f} bits/weight"


def eval_lines(result: dict[str, Any]) -> list[str]:
    """The evaluation as a reader wants it: the model, its baseline, then each number beside the baseline's."""
    base = result.get("baseline")
    lines = [f"model     {result['model']}  ({_bits(result['bits_per_weight'])})"]
    if base:
        lines.append(f"baseline  {base['model']}  ({_bits(base['bits_per_weight'])}"
                     + (", cached result)" if base.get("cached") else ")"))
    elif result.get("baseline_note"):
        lines.append(f"baseline  none: {result['baseline_note']}")
    if result.get("ppl"):
        lines += ["", f"perplexity (ctx {result['ctx']}; windows: evaluated/all"
                  + (", evenly spread" if result.get("max_windows") else "") + ")"]
        header = ["text", "windows", "quantized" if base else "ppl", *(["FP baseline", "change"] if base else [])]
        rows = []
        for stem, value in result["ppl"].items():
            used, total = result["windows"][stem]
            row = [stem, f"{used}/{total}", f"{value:.3f}"]
            if base:
                ref = base["ppl"][stem]
                row += [f"{ref:.3f}", f"{100 * (value / ref - 1):+.2f} %"]
            rows.append(row)
        lines.append(markdown_table(header, rows))
    if result.get("tasks"):
        lines += ["", "zero-shot tasks" + (f" (first {result['limit']} items)" if result.get("limit") else "")]
        header = ["task", "n", "metric", "quantized" if base else "score", *(["FP baseline"] if base else [])]
        rows = []
        for task, scores in result["tasks"].items():
            for metric, value in scores.items():
                if metric == "n":
                    continue
                row = [task, str(scores["n"]), metric, f"{value:.4f}"]
                if base:
                    row.append(f"{base['tasks'][task][metric]:.4f}")
                rows.append(row)
        lines.append(markdown_table(header, rows))
    return lines


@cli.command()
@click.argument("model")
@click.argument("out")
@click.option("--methods", default="rtn,gptq,hqq,quipsharp", show_default=True,
              help="Comma-separated; see `harpq methods` (harp takes hours on a CPU).")
@click.option("--bits", "bits_list", default="2,3,4", show_default=True)
@click.option("--group-size", type=int, default=None, help="Group size of rtn, gptq and hqq [default: theirs].")
@click.option("--ppl", "ppl_files", multiple=True, required=True, type=click.Path(), help="Text file (repeatable).")
@click.option("--max-windows", type=int, default=None, help="Perplexity over N evenly spread windows of each text.")
@click.option("--calib", type=click.Path(), default=None, help="Calibration text for the methods that need it.")
@click.option("--tasks", default=None, help=f"Comma-separated zero-shot tasks ({','.join(TASKS)}).")
@click.option("--tasks-dir", type=click.Path(), default=str(DEFAULT_TASKS_DIR), show_default=True)
@click.option("--limit", type=int, default=None, help="Score only the first N items of each task.")
@click.option("--ctx", type=int, default=512, show_default=True)
@click.option("--nsamples", type=int, default=128, show_default=True)
@click.option("--seqlen", type=int, default=512, show_default=True)
@click.option("--harp-steps", type=int, default=None, help="HARP: Adam steps per module. [default: 40]")
@click.option("--keep-models/--no-keep-models", default=True, show_default=True,
              help="Keep each quantized model under OUT/models (to run, export or evaluate further).")
@click.option("--device", default="cpu", show_default=True)
@common
def compare(model, out, methods, bits_list, group_size, ppl_files, max_windows, calib, tasks, tasks_dir, limit, ctx,
            nsamples, seqlen, harp_steps, keep_models, device) -> None:
    """Quantize MODEL with each method and bit width, evaluate each beside FP, print a table and write
    OUT/report.md (re-run to resume)."""
    from ..eval.compare import compare as run

    settings: dict[str, dict[str, Any]] = {}
    if harp_steps is not None:
        settings["harp"] = {"harp_steps": harp_steps}
    if group_size is not None:
        for m in ("rtn", "gptq", "hqq"):
            settings[m] = {"group_size": group_size}
    try:
        bits = [int(b) for b in bits_list.split(",") if b.strip()]
    except ValueError:
        _fail(f"--bits takes comma-separated integers, not {bits_list!r}")
    path, table = run(model, out, [m.strip() for m in methods.split(",") if m.strip()], bits, list(ppl_files),
                      calib=calib, tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks else [],
                      tasks_dir=tasks_dir, limit=limit, ctx=ctx, nsamples=nsamples, seqlen=seqlen, device=device,
                      settings=settings, echo=click.echo, max_windows=max_windows, keep_models=keep_models)
    click.echo("\n" + table + "\n")
    click.echo(f"wrote {path}")


@cli.command()
@click.argument("model")
@click.argument("prompt")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@common
def generate(model, prompt, max_new_tokens, device) -> None:
    """Greedy continuation of PROMPT by MODEL (on CUDA: static KV cache, CUDA-graph decode)."""
    if not prompt.strip():
        _fail("the prompt is empty")
    if max_new_tokens < 1:
        _fail(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
    from ..api import generate as run

    click.echo(prompt + run(model, prompt, max_new_tokens=max_new_tokens, device=device))


@cli.command()
@click.option("--shape", default="llama-2-7b", show_default=True, help="llama-2-7b, llama-3-8b or llama-2-70b.")
@click.option("--formats", default="fp16,rtn4,rtn2,hqq4,hqq2,quipsharp2,quipsharp3,quipsharp4,harp2,harp3,harp4",
              show_default=True)
@click.option("--batch", "batches", default="1,4,16", show_default=True, help="Comma-separated batch sizes.")
@click.option("--steps", type=int, default=64, show_default=True, help="Decode steps per timed run.")
@click.option("--json", "json_out", type=click.Path(), default=None, help="Write the results as JSON here.")
@common
def bench(shape, formats, batches, steps, json_out) -> None:
    """Decode tok/s of a SHAPE model with random weights on the GPU: FP16 and each format, one run."""
    import torch

    if not torch.cuda.is_available():
        _fail("harpq bench times the CUDA decode path: no CUDA device here")
    from ..engine import bench as b

    try:
        batch_sizes = [int(x) for x in batches.split(",") if x.strip()]
    except ValueError:
        _fail(f"--batch takes comma-separated integers, not {batches!r}")
    result = b.run(shape, [f.strip() for f in formats.split(",") if f.strip()], batch_sizes, steps=steps,
                   echo=click.echo, json_path=json_out)
    click.echo(b.table(result))


def _os_message(e: OSError) -> str:
    """An operating-system failure in one line: what, and on which file."""
    import errno

    what = {errno.ENOSPC: "no space left on the device", errno.EACCES: "permission denied",
            errno.EROFS: "read-only file system", errno.ENOENT: "no such file or directory"}.get(e.errno)
    where = f": {e.filename}" if getattr(e, "filename", None) else ""
    return f"{what or e.strerror or type(e).__name__}{where}"


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"  # torch.cuda's, without torch


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
    except Exception as e:  # noqa: BLE001 - the last resort: one line, and the way to the traceback
        if _out_of_memory(e):
            _fail("out of memory: try fewer --nsamples, a shorter --seqlen or --ctx, or a smaller --batch-size")
        if "--debug" in args:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        click.echo(f"harpq: internal error: {type(e).__name__}: {first} (a bug; rerun with --debug for the "
                   "traceback)", err=True)
        sys.exit(1)


__all__ = ["cli", "main"]
