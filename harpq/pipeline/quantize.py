"""The layer-wise pipeline: one decoder layer on the device at a time.

Capture layer 0's inputs for the calibration windows; then per layer: accumulate Hessians while the
calibration inputs run through it, quantize each linear, run the (now quantized) layer again to make
the next layer's inputs. Peak memory: one layer, its Hessians and the calibration activations.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..codebooks import make_codebook
from ..errors import HarpqError
from ..eval.perplexity import unquantized_weights
from ..io.checkpoint import finish_checkpoint, save_quantized, staging_dir
from ..io.hf_integration import QUANT_METHOD
from ..io.model import (
    attention_windows,
    check_finite,
    find_decoder_layers,
    layer_linears,
    load_model,
    load_tokenizer,
    read_config,
)
from ..nn import QuantLinear
from ..recipe import LayerRecipe, Recipe, derive_seed
from .calibration import calibration_windows
from .experts import EXPERT_MATRICES, ExpertHessians, layer_experts, quantize_experts
from .hessian import HessianCollector
from .linear import LinearReport, check_recipe, check_recipe_fits, quantize_linear, quantize_shared_input
from .resume import LayerCheckpoints, file_digest, model_digest
from .stream import meta_skeleton, quantize_streaming

log = logging.getLogger(__name__)
SWEEP_FACTORS = (0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15)


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, tokens: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Hidden states entering the first decoder layer (float32, on `device`), and each layer's other kwargs.

    The kwargs (rotary tables, attention mask) are those of layer 0, except where layers attend
    differently (sliding windows on some layers): then one calibration window runs through the whole
    model once to read each layer's own mask."""
    inputs: list[torch.Tensor] = []
    layer_kwargs: dict[str, Any] = {}

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.append(hidden.detach().to(device, torch.float32))
        layer_kwargs.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    embed = model.get_input_embeddings()
    embed_dtype = embed.weight.dtype
    embed.float()  # so rotary tables and the first hidden states are made in float32
    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for row in tokens:
            try:
                model(row[None], use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        embed.to(embed_dtype)
    first = _to_device(layer_kwargs, device)
    if len(set(attention_windows(model.config))) <= 1 or "attention_mask" not in first:
        return torch.cat(inputs), [first] * len(layers)
    return torch.cat(inputs), [{**first, "attention_mask": mask} for mask in _layer_masks(model, layers, tokens[:1],
                                                                                           device)]


@torch.no_grad()
def _layer_masks(model: nn.Module, layers: nn.ModuleList, tokens: torch.Tensor, device: torch.device) -> list:
    """The attention mask each decoder layer receives, read from one forward pass (they depend on positions
    only, and every calibration window has the same length)."""
    masks: list = [None] * len(layers)

    def grab(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            masks[i] = _to_device(kwargs.get("attention_mask"), device)
            if i == len(layers) - 1:
                raise _StopForward
        return hook

    handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model(tokens, use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return masks


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, torch.float32) if obj.is_floating_point() else obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: torch.Tensor, kwargs: dict[str, Any], batch: int,
              on_batch=None) -> torch.Tensor:
    outputs = torch.empty_like(inputs)
    for i in range(0, inputs.shape[0], batch):
        out = layer(inputs[i : i + batch], **kwargs)
        outputs[i : i + batch] = out[0] if isinstance(out, tuple) else out
        if on_batch is not None:
            on_batch()
    return outputs


def resolve_device(device: str | torch.device) -> torch.device:
    """cpu or cuda[:N], checked against the machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise HarpqError(f"unknown device {device!r} (use cpu or cuda)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HarpqError("--device cuda asked for, but no CUDA GPU is visible")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise HarpqError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return dev


def check_run_settings(nsamples: int, seqlen: int, seed: int, batch_size: int, hidden: int | None = None) -> None:
    """Values a typo makes absurd, refused before any work (and the calibration activations that would
    not fit in memory: nsamples × seqlen × hidden float32, twice)."""
    if nsamples < 1 or seqlen < 2:
        raise HarpqError(f"need at least one calibration window of 2+ tokens, got {nsamples} × {seqlen}")
    if not 0 <= seed < 2**63:
        raise HarpqError(f"--seed must be between 0 and 2^63 - 1, not {seed}")
    if batch_size < 1:
        raise HarpqError(f"batch size must be at least 1, not {batch_size}")
    if hidden:
        need = 2 * nsamples * seqlen * hidden * 4
        try:
            have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            have = None
        if have and need > have:
            raise HarpqError(f"{nsamples} × {seqlen} calibration tokens need {need / 2**30:.1f} GiB of activations; "
                             f"this machine has {have / 2**30:.1f} GiB (use fewer --nsamples or a shorter --seqlen)")


def plan_modules(
    layers: nn.ModuleList, prefix: str, recipe: Recipe, check_values: bool = True
) -> list[dict[str, LayerRecipe]]:
    """Per decoder layer: relative name -> its recipe, for every linear and both matrices of every experts
    module ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"); checks every layer before any work."""
    plan = []
    for i, layer in enumerate(layers):
        chosen = {}
        for rel, linear in layer_linears(layer).items():
            full = f"{prefix}.{i}.{rel}"
            layer_recipe = recipe.for_module(full)
            if layer_recipe is not None:
                check_recipe_fits(full, linear, layer_recipe, check_values)
                chosen[rel] = layer_recipe
        for rel, experts in layer_experts(layer).items():
            picked = {w: recipe.for_module(f"{prefix}.{i}.{rel}.{w}") for w in EXPERT_MATRICES}
            if all(r is None for r in picked.values()):
                continue
            if any(r is None for r in picked.values()):
                raise HarpqError(f"{prefix}.{i}.{rel}: quantize both gate_up_proj and down_proj of the experts, "
                                 "or neither")
            for w, r in picked.items():
                weight = getattr(experts, w)
                full = f"{prefix}.{i}.{rel}.{w}"
                if check_values:
                    check_finite(full, weight.detach())
                make_codebook(r.codebook_config()).check_shape(weight.shape[1], weight.shape[2], full)
                chosen[f"{rel}.{w}"] = r
        plan.append(chosen)
    return plan


def _experts_plan(chosen: dict[str, LayerRecipe], experts: dict[str, nn.Module]) -> dict[str, dict[str, LayerRecipe]]:
    """The planned experts modules of one layer: relative name -> {matrix: recipe}."""
    return {rel: {w: chosen[f"{rel}.{w}"] for w in EXPERT_MATRICES} for rel in experts
            if f"{rel}.{EXPERT_MATRICES[0]}" in chosen}


def _with_input_seed(layer_recipe: LayerRecipe, rel: str, collector: HessianCollector, where: str,
                     base_seed: int) -> LayerRecipe:
    """Linears that read the same input tensor get the same input-side transform (seeded by the group)."""
    return replace(layer_recipe, input_seed=derive_seed(base_seed, where + collector.group_of[rel]))


def _apply_scale_sweep(
    recipe: Recipe, plan: list[dict[str, LayerRecipe]], prefix: str, linears: dict[str, nn.Linear],
    collector: HessianCollector | None,
) -> list[dict[str, LayerRecipe]]:
    """Pick the e8p stage-one scale ρ on the first decoder layer's summed proxy loss; use it everywhere."""
    if collector is None:
        raise HarpqError("--scale-sweep needs calibration text (it compares proxy losses)")
    e8p = {rel: r for rel, r in plan[0].items() if r.codebook == "e8p" and rel in linears}
    if not e8p:
        raise HarpqError("--scale-sweep applies to the e8p codebook only")
    default = make_codebook(next(iter(e8p.values())).codebook_config()).rho
    scores = {}
    for factor in SWEEP_FACTORS:
        rho = round(default * factor, 4)
        scores[rho] = 0.0
        for rel, r in e8p.items():
            trial = _with_input_seed(replace(r, e8p_scale=rho), rel, collector, f"{prefix}.0.", recipe.layer.seed)
            scores[rho] += quantize_linear(rel, linears[rel], collector.hessian(rel), trial)[1].proxy_loss
    best = min(scores, key=scores.get)
    log.info("scale sweep (rho: summed proxy loss of layer 0): %s -> %s", scores, best)
    return _set_e8p_scale(recipe, plan, best)


def _set_e8p_scale(recipe: Recipe, plan: list[dict[str, LayerRecipe]], rho: float) -> list[dict[str, LayerRecipe]]:
    recipe.layer = replace(recipe.layer, e8p_scale=rho)
    return [{rel: replace(r, e8p_scale=rho) if r.codebook == "e8p" else r for rel, r in chosen.items()}
            for chosen in plan]


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    recipe: Recipe,
    tokens: torch.Tensor | None = None,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    log_path: Path | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """Quantize `model` in place, one decoder layer at a time; returns the spec of every QuantLinear.

    `tokens` (nsamples, seqlen) are the calibration windows, needed by recipes that use Hessians.
    """
    prefix, layers = find_decoder_layers(model)
    plan = plan_modules(layers, prefix, recipe)
    if tokens is None and any(r.needs_hessian for chosen in plan for r in chosen.values()):
        raise HarpqError(f"method {recipe.method} needs calibration text: pass --calib FILE (.txt or .jsonl)")
    return _quantize_planned(model, recipe, plan, tokens, resolve_device(device), batch_size, log_path, progress)


def _shared_input_groups(layer_plan: dict[str, LayerRecipe], linears: dict[str, nn.Module],
                         collector: HessianCollector | None, where: str, base_seed: int
                         ) -> dict[str, tuple[list[str], list[LayerRecipe]] | None]:
    """HARP linears of one layer that read the same input with the same settings (q/k/v, gate/up): the
    first of each group -> (its members, their recipes); the others -> None (done with the first)."""
    if collector is None:
        return {}
    groups: dict[tuple, list[tuple[str, LayerRecipe]]] = {}
    for rel, layer_recipe in layer_plan.items():
        if rel in linears and layer_recipe.processor == "harp" and rel in collector.group_of:
            r = _with_input_seed(layer_recipe, rel, collector, where, base_seed)
            groups.setdefault((collector.group_of[rel], replace(r, seed=0)), []).append((rel, r))
    out: dict[str, tuple[list[str], list[LayerRecipe]] | None] = {}
    for members in groups.values():  # same settings but each its own output side's seed
        if len(members) > 1:
            out[members[0][0]] = ([m for m, _ in members], [r for _, r in members])
            out.update({m: None for m, _ in members[1:]})
    return out


def _tie_input_sides(layer: nn.Module, layer_plan: dict[str, LayerRecipe], collector: HessianCollector,
                     where: str) -> dict[str, str]:
    """Quantized linears of one layer that read one input and ended with equal input sides (q/k/v, gate/up
    under RHT, Kronecker or a jointly fitted HARP side) take the first one's: the checkpoint stores the side
    once. Returns member -> the linear whose side it took."""
    leaders: dict[int, str] = {}
    tied = {}
    for rel in layer_plan:
        if rel not in collector.group_of:
            continue
        mod = layer.get_submodule(rel)
        if not isinstance(mod, QuantLinear) or not mod.input_side_names():
            continue
        first = leaders.setdefault(collector.group_of[rel], rel)
        if first != rel and mod.shares_input_side(layer.get_submodule(first)):
            mod.take_input_side(layer.get_submodule(first), where + first)
            tied[rel] = first
    return tied


class HarpBudget:
    """A run's seconds of HARP fitting, shared by the HARP linears still to quantize: each gets what is
    left over what remains to do, so a fit that ends early leaves its time to the next."""

    def __init__(self, seconds: float, modules: int):
        self.left, self.modules = float(seconds), modules

    def share(self) -> float:
        return max(0.0, self.left) / max(1, self.modules)

    def spend(self, seconds: float) -> None:
        self.left -= seconds
        self.modules -= 1


def _quantize_planned(
    model: nn.Module, recipe: Recipe, plan: list[dict[str, LayerRecipe]], tokens: torch.Tensor | None,
    dev: torch.device, batch_size: int, log_path: Path | None, progress: bool,
    checkpoints: LayerCheckpoints | None = None,
) -> dict[str, dict]:
    prefix, layers = find_decoder_layers(model)
    inputs = kwargs_of = None
    if tokens is not None:
        inputs, kwargs_of = capture_layer_inputs(model, layers, tokens, dev)

    specs: dict[str, dict] = {}
    done = checkpoints.done if checkpoints is not None else 0
    if done and "e8p_scale" in checkpoints.extra:  # the sweep of the first run decided the scale
        plan = _set_e8p_scale(recipe, plan, checkpoints.extra["e8p_scale"])
    budget = None
    if recipe.harp_budget is not None:
        budget = HarpBudget(recipe.harp_budget, sum(r.processor == "harp" for layer_plan in plan[done:]
                                                    for r in layer_plan.values()))
    for i, layer in enumerate(tqdm(layers, desc="quantizing", unit="layer", disable=not progress)):
        layer_dtype = next(layer.parameters()).dtype
        kwargs = kwargs_of[i] if kwargs_of is not None else None
        if i < done:  # finished by an interrupted run of this command: load it, recompute what follows
            specs.update(checkpoints.restore(i, layer, prefix))
            if inputs is not None:
                layer.to(dev, torch.float32)
                inputs = run_layer(layer, inputs, kwargs, batch_size)
                layer.to("cpu", layer_dtype)
            if i == done - 1:
                checkpoints.restore_rng()
            continue
        layer.to(dev, torch.float32)
        linears = layer_linears(layer)
        experts = _experts_plan(plan[i], layer_experts(layer))
        collector = None
        expert_hessians: dict[str, ExpertHessians] = {}
        if inputs is not None:
            collector = HessianCollector({k: linears[k] for k in plan[i] if k in linears})
            expert_hessians = {rel: ExpertHessians(layer.get_submodule(rel)) for rel in experts}
            run_layer(layer, inputs, kwargs, batch_size, on_batch=collector.end_pass)
            collector.remove()
            for hooks in expert_hessians.values():
                hooks.remove()
        if i == 0 and recipe.scale_sweep:
            plan = _apply_scale_sweep(recipe, plan, prefix, linears, collector)
            if checkpoints is not None:
                checkpoints.extra["e8p_scale"] = recipe.layer.e8p_scale
        for rel, recipes in experts.items():
            full = f"{prefix}.{i}.{rel}"
            hooks = expert_hessians.get(rel)
            hessians = {w: hooks.hessians(w, full) for w in recipes} if hooks is not None else None
            module, reports = quantize_experts(full, layer.get_submodule(rel), recipes, hessians,
                                               getattr(model.config, "hidden_act", "silu"))
            _set_submodule(layer, rel, module)
            specs[full] = module.spec()
            if log_path is not None:
                with log_path.open("a") as f:
                    f.writelines(json.dumps({**report.to_dict(), "layer": i}) + "\n" for report in reports)
        del expert_hessians
        shared = _shared_input_groups(plan[i], linears, collector, f"{prefix}.{i}.", recipe.layer.seed)
        reports: dict[str, LinearReport] = {}  # logged once the layer's linears have shared what they share
        for rel, layer_recipe in plan[i].items():
            if rel not in linears or (rel in shared and shared[rel] is None):
                continue
            if rel in shared:  # HARP linears reading one input: one fit of their shared input side
                members, recipes = shared[rel]
                if budget is not None:
                    recipes = [replace(r, harp_seconds=budget.share() * len(members)) for r in recipes]
                results = quantize_shared_input([f"{prefix}.{i}.{r}" for r in members], [linears[r] for r in members],
                                                collector.hessian(rel), recipes)
                for r, (module, report) in zip(members, results, strict=True):
                    if budget is not None:  # the group's fit seconds are in its first linear's report
                        budget.spend(report.parts.get("fit", {}).get("seconds", 0.0))
                    _set_submodule(layer, r, module)
                    specs[f"{prefix}.{i}.{r}"] = module.spec()
                    reports[r] = report
                continue
            full = f"{prefix}.{i}.{rel}"
            hessian = None
            if collector is not None and rel not in collector.group_of:  # e.g. an expert no token was routed to
                log.warning("%s saw no calibration input: quantized with an identity Hessian", full)
                hessian = torch.eye(linears[rel].in_features, dtype=torch.float64, device=dev)
            elif collector is not None:  # linears reading the same input share its transform and Hessian
                hessian = collector.hessian(rel)
                layer_recipe = _with_input_seed(layer_recipe, rel, collector, f"{prefix}.{i}.", recipe.layer.seed)
            if budget is not None and layer_recipe.processor == "harp":
                layer_recipe = replace(layer_recipe, harp_seconds=budget.share())
            module, report = quantize_linear(full, linears[rel], hessian, layer_recipe)
            if budget is not None and layer_recipe.processor == "harp":
                budget.spend(report.parts.get("fit", {}).get("seconds", 0.0))
            _set_submodule(layer, rel, module)
            specs[full] = module.spec()
            reports[rel] = report
        if collector is not None:
            for rel in _tie_input_sides(layer, plan[i], collector, f"{prefix}.{i}."):
                module = layer.get_submodule(rel)
                specs[f"{prefix}.{i}.{rel}"] = module.spec()
                reports[rel].bits_per_weight = module.stored_bits() / (module.out_features * module.in_features)
        if log_path is not None:
            with log_path.open("a") as f:
                f.writelines(json.dumps({**report.to_dict(), "layer": i}) + "\n" for report in reports.values())
        del collector
        if inputs is not None:
            inputs = run_layer(layer, inputs, kwargs, batch_size)
        layer.to("cpu", layer_dtype)
        if checkpoints is not None:
            checkpoints.commit(i, layer, specs)
    return specs


def quantize(
    model: str | Path,
    out: str | Path,
    recipe: Recipe | None = None,
    *,
    calib: str | Path | None = None,
    nsamples: int = 128,
    seqlen: int = 512,
    device: str = "cpu",
    seed: int = 0,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Quantize the model directory `model` into the new directory `out`; returns `out`.

    The layer-wise path commits each finished decoder layer; the same call after an interruption
    continues from the first unfinished one (`pipeline.resume`)."""
    from .. import __version__

    recipe = copy.deepcopy(recipe or Recipe.preset("rtn"))  # a scale sweep records its choice in it
    check_recipe(recipe)
    resolve_device(device)
    source_config = read_config(model)
    quantized = (source_config.get("quantization_config") or {}).get("quant_method")
    if quantized:
        raise HarpqError(f"{model} is already quantized ({quantized}): quantize the original model")
    check_run_settings(nsamples, seqlen, seed, batch_size, source_config.get("hidden_size") if calib else None)
    if calib is not None and not Path(calib).is_file():
        raise HarpqError(f"calibration file not found: {calib}")
    reads = [model] + ([calib] if calib is not None else [])
    stream = calib is None and not any(r.needs_hessian for r in recipe.layer_variants())
    if stream and any(layer_experts(layer) for layer in find_decoder_layers(meta_skeleton(model))[1]):
        stream = False  # experts are stored per expert on disk and merged by transformers on load: load it
    with staging_dir(out, overwrite, reads, resumable=not stream) as tmp:
        if stream:  # no data needed: quantize tensor by tensor from the files, never loading the model
            skeleton = meta_skeleton(model)
            prefix, layers = find_decoder_layers(skeleton)
            plan = plan_modules(layers, prefix, recipe, check_values=False)  # values are checked as read
            specs = quantize_streaming(model, tmp, skeleton, plan, prefix, resolve_device(device), progress,
                                       recipe.layer.seed)
            config = json.loads((Path(model) / "config.json").read_text())
            config.pop("quantization_config", None)
        else:
            lm = load_model(model)
            prefix, layers = find_decoder_layers(lm)
            plan = plan_modules(layers, prefix, recipe)  # every bad setting fails here, before any work
            if calib is None and any(r.needs_hessian for chosen in plan for r in chosen.values()):
                raise HarpqError(f"method {recipe.method} needs calibration text: pass --calib FILE (.txt or .jsonl)")
            tokens = None
            if calib is not None:
                tokens = calibration_windows(load_tokenizer(model), calib, nsamples, seqlen, seed)
            dev = resolve_device(device)
            fingerprint = {"recipe": recipe.to_dict(), "model": model_digest(model), "device": dev.type,
                           "batch_size": batch_size, "harpq": __version__, "calibration": None if calib is None
                           else {"file": file_digest(calib), "nsamples": nsamples, "seqlen": seqlen, "seed": seed}}
            checkpoints = LayerCheckpoints(tmp, fingerprint)
            specs = _quantize_planned(lm, recipe, plan, tokens, dev, batch_size, tmp / "quant_log.jsonl", progress,
                                      checkpoints)
            checkpoints.finish()
            left = unquantized_weights(lm)
            if left:
                log.warning("%d weights of the decoder layers' linears and experts stay unquantized (the recipe "
                            "excludes them)", left)
            config = lm.config.to_dict()
        quantization_config = {
            "quant_method": QUANT_METHOD,
            "format_version": 1,
            "harpq_version": __version__,
            "recipe": recipe.to_dict(),
            "calibration": None if calib is None else
            {"file": Path(calib).name, "nsamples": nsamples, "seqlen": seqlen, "seed": seed},
            "source": {"path": str(Path(model).resolve()), "digest": model_digest(model)},  # for the FP baseline
            "modules": specs,
        }
        if stream:
            finish_checkpoint(tmp, config, model, quantization_config)
        else:
            save_quantized(lm, model, tmp, quantization_config)
    return Path(out)
