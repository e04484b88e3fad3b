"""One linear layer through processor → codebook → rounding → QuantLinear."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from ..codebooks import make_codebook
from ..errors import HarpqError
from ..io.model import check_finite
from ..nn import QuantLinear
from ..processors import make_processor
from ..processors.incoherence import hessian_incoherence, weight_incoherence
from ..recipe import LayerRecipe, Recipe, check_pattern
from ..rounding import ROUNDINGS, proxy_loss, round_weight

log = logging.getLogger(__name__)


@dataclass
class LinearReport:
    module: str
    shape: tuple[int, int]
    proxy_loss: float | None
    seconds: float
    bits_per_weight: float
    incoherence: dict[str, float | None]
    parts: dict[str, Any]

    def to_dict(self) -> dict:
        """One line of quant_log.jsonl."""
        return {"module": self.module, "shape": list(self.shape), "proxy_loss": self.proxy_loss,
                "seconds": round(self.seconds, 4), "bits_per_weight": round(self.bits_per_weight, 5),
                "incoherence": {k: None if v is None else round(v, 3) for k, v in self.incoherence.items()},
                **self.parts}


def check_recipe(recipe: Recipe) -> None:
    """Fail fast on settings no layer could use (bits, group size, part names, patterns), before loading a model."""
    for pattern in recipe.ignore:
        check_pattern(pattern, "ignore")
    for pattern, changes in recipe.overrides:
        check_pattern(pattern, "override")
        unknown = set(changes) - {f.name for f in fields(LayerRecipe)}
        if unknown:
            raise HarpqError(f"override {pattern!r}: unknown setting(s) {', '.join(sorted(unknown))}")
    for layer in recipe.layer_variants():
        make_codebook(layer.codebook_config())
        make_processor(layer.processor_config())
        if layer.rounding not in ROUNDINGS:
            raise HarpqError(f"unknown rounding {layer.rounding!r} (offered: {', '.join(ROUNDINGS)})")
        if not 0 <= layer.damp < 10:
            raise HarpqError(f"damping must be in [0, 10), not {layer.damp}")
        if layer.tune_passes < 0:
            raise HarpqError(f"tune passes must be 0 or more, not {layer.tune_passes}")


def check_recipe_fits(name: str, linear: nn.Linear, recipe: LayerRecipe, check_values: bool = True) -> None:
    """Fail before any work if the recipe cannot store this layer (bits, group size, shape, NaN/Inf)."""
    if check_values:
        check_finite(name, linear.weight.detach())
    make_codebook(recipe.codebook_config()).check_shape(linear.out_features, linear.in_features, name)
    make_processor(recipe.processor_config())


@dataclass
class _Rounded:
    """One candidate's processor buffers and what rounding made of the weight under them."""

    buffers: dict[str, torch.Tensor]
    w_proc: torch.Tensor
    h_proc: torch.Tensor | None
    state: dict[str, torch.Tensor]
    codes: torch.Tensor
    loss: float | None


def _round(processor, codebook, pbuf, weight, hessian, recipe: LayerRecipe) -> _Rounded:
    w_proc = processor.transform_weight(pbuf, weight)
    h_proc = processor.transform_hessian(pbuf, hessian) if hessian is not None else None
    state = codebook.prepare(w_proc)
    codes, recon = round_weight(recipe.rounding, w_proc, h_proc, codebook, state, recipe.damp,
                                recipe.act_order, recipe.tune_passes)
    loss = proxy_loss(w_proc, recon, h_proc) if h_proc is not None else None
    return _Rounded(pbuf, w_proc, h_proc, state, codes, loss)


def _finish(name: str, weight: torch.Tensor, bias: torch.Tensor | None, hessian: torch.Tensor | None,
            recipe: LayerRecipe, processor, codebook, rounded: list[_Rounded], chosen: int,
            start: float) -> tuple[QuantLinear, LinearReport]:
    """The QuantLinear of candidate `chosen` (0: fitted or the only one; 1: the learnable start) and its report."""
    m, n = weight.shape
    best = rounded[chosen]
    module = QuantLinear(n, m, codebook, processor, bias=bias is not None, device=weight.device)
    module.load_quantized({**codebook.encode(best.codes, best.state), **best.buffers},
                          bias.detach().float() if bias is not None else None)
    seconds = time.perf_counter() - start
    mu = {"w_before": weight_incoherence(weight), "w_after": weight_incoherence(best.w_proc)}
    if hessian is not None and recipe.processor != "none":
        mu.update(h_before=hessian_incoherence(hessian), h_after=hessian_incoherence(best.h_proc))
    parts = {"rounding": recipe.rounding, "processor": recipe.processor, "codebook": codebook.config()}
    if processor.learnable:
        fit = dict(getattr(processor, "last_fit", {}))
        if len(rounded) > 1:
            fit.update(proxy_loss_start=rounded[1].loss, kept="fitted" if chosen == 0 else "start")
        parts["fit"] = fit
    report = LinearReport(name, (m, n), best.loss, seconds, module.stored_bits() / (m * n), mu, parts)
    fit = parts.get("fit", {})
    fit_note = f", HARP fit {fit['steps']} steps in {fit['seconds']:.2f} s" if "seconds" in fit else ""
    if fit.get("shared_input"):
        fit_note += f" (input side shared by {fit['shared_input']} linears)"
    if fit.get("stopped"):
        fit_note += f" (stopped at its {fit['budget_s']:.2f} s share of --harp-budget)"
    log.info("%s: %s %d-bit, %.3f bits/weight, proxy loss %s, %.2f s%s", name, recipe.codebook, recipe.bits,
             report.bits_per_weight, "-" if report.proxy_loss is None else f"{report.proxy_loss:.4g}", report.seconds,
             fit_note)
    return module, report


def _weight_and_bias(linear: nn.Linear | torch.Tensor, bias: torch.Tensor | None):
    if isinstance(linear, nn.Linear):
        linear, bias = linear.weight, linear.bias
    return linear.detach().float(), bias


def quantize_linear(
    name: str, linear: nn.Linear | torch.Tensor, hessian: torch.Tensor | None, recipe: LayerRecipe,
    bias: torch.Tensor | None = None,
) -> tuple[QuantLinear, LinearReport]:
    """Quantize a linear layer (or its weight tensor, with `bias`) on its current device."""
    start = time.perf_counter()
    weight, bias = _weight_and_bias(linear, bias)
    m, n = weight.shape
    codebook = make_codebook(recipe.codebook_config())
    processor = make_processor(recipe.processor_config())
    start_buffers = {k: v.to(weight.device) for k, v in processor.init_buffers(m, n).items()}
    candidates = [processor.fit(start_buffers, weight, hessian, codebook)]
    if processor.learnable and candidates[0] is not start_buffers:  # fitting must never end worse than its start
        candidates.append(start_buffers)
    rounded = [_round(processor, codebook, pbuf, weight, hessian, recipe) for pbuf in candidates]
    chosen = min(range(len(rounded)), key=lambda i: rounded[i].loss if rounded[i].loss is not None else 0.0)
    return _finish(name, weight, bias, hessian, recipe, processor, codebook, rounded, chosen, start)


def quantize_shared_input(
    names: list[str], linears: list[nn.Linear | torch.Tensor], hessian: torch.Tensor, recipes: list[LayerRecipe],
) -> list[tuple[QuantLinear, LinearReport]]:
    """Quantize learnable-processor linears that read one input (q/k/v, gate/up) with one input side fitted
    for all of them (`HARP.fit_shared_input`). The group keeps the fitted sides where every one of its
    linears ends at or below its start's proxy loss, else the start for all, so that the linears keep
    one input side (the step applies it once) and none ends above its start."""
    start = time.perf_counter()
    pairs = [_weight_and_bias(lin, None) for lin in linears]
    weights = [w for w, _ in pairs]
    codebook = make_codebook(recipes[0].codebook_config())
    processors = [make_processor(r.processor_config()) for r in recipes]
    starts = [{k: v.to(w.device) for k, v in p.init_buffers(*w.shape).items()} for p, w in zip(processors, weights,
                                                                                             strict=True)]
    fitted = processors[0].fit_shared_input(starts, weights, hessian, codebook)
    rounded = [[_round(p, codebook, pbuf, w, hessian, r) for pbuf in (f, s)]
               for p, w, f, s, r in zip(processors, weights, fitted, starts, recipes, strict=True)]
    chosen = 0 if all(r[0].loss <= r[1].loss for r in rounded) else 1
    out = []
    for j, (name, (w, b), p, r, recipe) in enumerate(zip(names, pairs, processors, rounded, recipes, strict=True)):
        if j:  # the group's fit is counted in its first linear (its time and its fit seconds)
            p.last_fit = {**processors[0].last_fit, "seconds": 0.0, "fitted_with": names[0]}
        out.append(_finish(name, w, b, hessian, recipe, p, codebook, r, chosen, start))
        start = time.perf_counter()
    return out
