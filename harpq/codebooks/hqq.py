"""HQQ's half-quadratic solver for the zero-points of a min–max scalar grid (calibration-free).

Per group, with the scale fixed at its min–max value, minimise ‖W − (W_q − z)·s‖_p^p (p = 0.7 < 1: a
few outliers may keep a large error instead of dragging the whole group) by half-quadratic splitting:
    W_e ← shrink_p(W − Ŵ(z), β)            (generalised soft-thresholding)
    z   ← mean_group(W_q − (W − W_e)/s)     (closed form)
    β   ← κ·β
for at most `iters` steps. Like HQQ it stops once the mean |W − Ŵ| stops improving, after also trying the
zero-point computed from that last state (which HQQ keeps without checking); harpq keeps the best z it
evaluated. Fully vectorised over all groups of a matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HQQSettings:
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """sign(x) · max(|x| − |x|^(p−1)/β, 0)."""
    a = x.abs()
    return torch.copysign(torch.relu(a - a.clamp(min=1e-12).pow(p - 1) / beta), x)


@torch.no_grad()
def hqq_solve(
    groups: torch.Tensor, bits: int, settings: HQQSettings = HQQSettings()
) -> tuple[torch.Tensor, torch.Tensor]:
    """groups (G, g) -> (scale, zero), each (G,), float32: w ≈ (clamp(round(w/scale + zero)) − zero)·scale."""
    w = groups.float()
    maxq = (1 << bits) - 1
    lo, hi = w.amin(1), w.amax(1)
    span = hi - lo
    inv = torch.where(span > 1e-4, maxq / span.clamp(min=1e-12), torch.ones_like(span)).clamp(max=2e4)[:, None]
    scaled = w * inv  # w/s: fixed, since only the zero-point moves
    zero = -lo[:, None] * inv
    beta = settings.beta
    best_err, best_zero = float("inf"), zero
    stopping = False
    for step in range(settings.iters + 1):
        q = (scaled + zero).round_().clamp_(0, maxq)
        err = (scaled - q + zero) / inv  # w − ŵ
        a = err.abs()
        mean_abs = float(a.mean())
        improved = mean_abs < best_err
        if improved:
            best_err, best_zero = mean_abs, zero
        elif stopping:  # the step after the first non-improvement was tried too (HQQ keeps it blindly)
            break
        if step == settings.iters:
            break
        stopping = not improved
        # W_e = shrink_p(w − ŵ); z ← mean(q − (w − W_e)/s)
        shrink = a.clamp(min=1e-12).pow_(settings.lp_norm - 1).div_(beta)  # a new tensor: `a` stays |err|
        w_e = torch.copysign(torch.relu_(a.sub_(shrink)), err)
        zero = (q - scaled + w_e * inv).mean(1, keepdim=True)
        beta *= settings.kappa
    return (1.0 / inv).view(-1), best_zero.view(-1)
