"""Fitting HARP's two sides to one linear layer, its Hessian and the backend's own codebook.

Loss (per step, W̃ = Q_out W Q_inᵀ, H̃ = Q_in H Q_inᵀ, s = RMS(W), which no rotation changes):
    mean_ij ((W̃_ij − sg(Q(W̃))_ij) / s)² · h̃_j / mean(h̃)   +   λ · ‖H̃ − blockdiag_g(H̃)‖²_F / n²
with Q the target codebook's nearest rounding, refreshed every `refresh` steps (stop-gradient; between
refreshes the last target stands in), h̃ = |diag(H̃)|
and g the codebook's group (8 for E8P, the group size of a scalar grid). H is normalised to a unit
mean diagonal first, so λ does not depend on the activations' scale. Adam over the skew parameters of
both sides; the best iterate by this loss is kept (the start counts), so fitting cannot end above it.
With a time budget the fit stops after the step that passes it (the start is always evaluated).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from ..codebooks.base import Codebook
from ..errors import HarpqError
from ..rounding.nearest import nearest
from .harp import ButterflySide
from .sides import Buffers


@dataclass(frozen=True)
class FitSettings:
    steps: int = 1200
    lr: float = 0.03
    hbd_lambda: float = 0.1
    hbd_max_n: int = 24672  # the regulariser's n×n work is skipped from this input size on
    seconds: float | None = None  # stop after the step that passes this much fitting time (None: all steps)
    refresh: int = 1  # search the codebook for a new target every `refresh` steps (the search dominates a step)


def quantizer_block(codebook: Codebook, n: int) -> int:
    """The block of inputs the codebook quantizes together: its vector size, else its scalar group."""
    if codebook.dim > 1:
        return codebook.dim
    group_len = getattr(codebook, "group_len", None)
    return group_len(n) if group_len is not None else n


def off_block_mass(h: torch.Tensor, g: int) -> torch.Tensor:
    """‖H − blockdiag_g(H)‖²_F: the mass outside the g×g diagonal blocks (a shorter last block if g ∤ n)."""
    n = h.shape[0]
    whole = n // g * g
    inside = h[:whole, :whole].reshape(n // g, g, n // g, g).diagonal(dim1=0, dim2=2).pow(2).sum()
    inside = inside + h[whole:, whole:].pow(2).sum()
    return h.pow(2).sum() - inside


def two_sided(w: torch.Tensor, out_side: ButterflySide, in_side: ButterflySide, ku, kv, su, sv) -> torch.Tensor:
    """Q_out W Q_inᵀ."""
    return out_side.apply(in_side.apply(w, kv, sv).T, ku, su).T


def fit_two_sided(
    out_side: ButterflySide,
    in_side: ButterflySide,
    buffers: Buffers,
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    codebook: Codebook,
    settings: FitSettings,
) -> tuple[Buffers, dict[str, Any]]:
    """-> (buffers with the fitted parameters rounded to their storage format, a summary of the fit)."""
    fitted, summary = fit_shared_input([out_side], in_side, [buffers], [weight], hessian, codebook, settings)
    return fitted[0], summary


def fit_shared_input(
    out_sides: list[ButterflySide],
    in_side: ButterflySide,
    buffers: list[Buffers],
    weights: list[torch.Tensor],
    hessian: torch.Tensor | None,
    codebook: Codebook,
    settings: FitSettings,
) -> tuple[list[Buffers], dict[str, Any]]:
    """Fit linears that read one input (q/k/v, gate/up): one input side for all of them, each its own output
    side, the loss the mean of their losses (each against its own target, scaled by its own RMS; the
    Hessian term once). One linear is the plain two-sided fit. -> (each linear's buffers with the fitted
    parameters, the shared input side's identical in all), a summary of the fit."""
    start = time.perf_counter()
    dev = weights[0].device
    ws = [w.detach().float() for w in weights]
    n = ws[0].shape[1]
    sv = buffers[0]["v_signs"].to(dev)
    if any(w.shape[1] != n for w in ws) or any(not torch.equal(b["v_signs"].to(dev), sv) for b in buffers):
        raise HarpqError("linears fitted with one input side need the same input width and input signs")
    sus = [b["u_signs"].to(dev) for b in buffers]
    params_us = [[p.to(dev).clone().requires_grad_() for p in side.load_params(b, "u_")]
                 for side, b in zip(out_sides, buffers, strict=True)]
    params_v = [p.to(dev).clone().requires_grad_() for p in in_side.load_params(buffers[0], "v_")]
    params = [p for pu in params_us for p in pu] + params_v
    if settings.steps == 0 or not params:
        return buffers, {"steps": 0}
    h = None
    if hessian is not None:
        h = hessian.detach().float().to(dev)
        h = h / h.diagonal().mean().clamp(min=1e-30)
    g = quantizer_block(codebook, n)
    use_hbd = h is not None and settings.hbd_lambda > 0 and g < n and n < settings.hbd_max_n
    scales = [w.pow(2).mean().sqrt().clamp(min=1e-30) for w in ws]
    opt = torch.optim.Adam(params, lr=settings.lr)
    best_loss, best_step, best = float("inf"), -1, [p.detach().clone() for p in params]
    first, targets = None, [None] * len(ws)
    for step in range(settings.steps + 1):
        kv = in_side.kernels(params_v, dev, torch.float32)
        column_weights = 1.0
        if h is not None:
            ht = in_side.apply(in_side.apply(h, kv, sv).T, kv, sv)  # Q H Qᵀ (symmetric)
            diag = ht.diagonal().detach().abs()
            column_weights = diag / diag.mean()
        loss = 0.0
        for i, (w, side, pu, su) in enumerate(zip(ws, out_sides, params_us, sus, strict=True)):
            wt = two_sided(w, side, in_side, side.kernels(pu, dev, torch.float32), kv, su, sv)
            if step % settings.refresh == 0:  # between refreshes the last target stands in (a surrogate)
                with torch.no_grad():
                    targets[i] = nearest(wt.detach(), codebook, codebook.prepare(wt.detach()))[1]
            loss = loss + (((wt - targets[i]) / scales[i]).pow(2) * column_weights).mean() / len(ws)
        if use_hbd:
            loss = loss + settings.hbd_lambda * off_block_mass(ht, g) / n**2
        value = float(loss.detach())
        if first is None:
            first = value
        if value < best_loss:
            best_loss, best_step, best = value, step, [p.detach().clone() for p in params]
        if step == settings.steps:
            break
        if settings.seconds is not None and time.perf_counter() - start >= settings.seconds:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    shared = in_side.store_params("v_", best[len(params) - len(params_v):])
    fitted, at = [], 0
    for side, pu, b in zip(out_sides, params_us, buffers, strict=True):
        fitted.append({**b, **side.store_params("u_", best[at:at + len(pu)]), **shared})
        at += len(pu)
    summary = {"steps": step, "best_step": best_step, "loss_start": round(first, 6),
               "loss_best": round(best_loss, 6), "hbd": use_hbd, "seconds": round(time.perf_counter() - start, 3)}
    if len(ws) > 1:
        summary["shared_input"] = len(ws)
    if step < settings.steps:
        summary.update(stopped="time budget", budget_s=round(settings.seconds, 3))
    return fitted, summary
