"""HQQ's half-quadratic solver for the zero-points of a min–max scalar grid (calibration-free).

Per group, with the scale s fixed at its min–max value, minimise ‖W − (W_q − z)·s‖_p^p (p = 0.7 < 1: a
few outliers may keep a large error instead of dragging the whole group) by half-quadratic splitting:
    W_e ← shrink_p(W − Ŵ(z), β) = sign·max(|·| − |·|^(p−1)/β, 0)     (generalised soft-thresholding)
    z   ← mean_group(W_q − (W − W_e)/s)                                (closed form)
    β   ← κ·β
for at most `iters` steps. Like HQQ it stops once the mean |W − Ŵ| stops improving, after also trying the
zero-point computed from that last state (which HQQ keeps without checking); harpq keeps the best z it
evaluated. Fully vectorised over all groups of a matrix.

The iteration runs in grid units (e = W/s + z − W_q), where the two steps fold into one clamp:
    z ← z − mean_group(clamp(e, −t, t)),   t = |e|^(p−1) · s^(p−2) / β,
so each step makes about ten passes over the matrix instead of twenty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HQQSettings:
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20


@torch.no_grad()
def hqq_solve(
    groups: torch.Tensor, bits: int, settings: HQQSettings = HQQSettings()
) -> tuple[torch.Tensor, torch.Tensor]:
    """groups (G, g) -> (scale, zero), each (G,), float32: w ≈ (clamp(round(w/scale + zero)) − zero)·scale.

    Iterates in float16 when given float16 groups (HQQ's usual setting on the GPU: half the memory
    traffic), else in float32; scales, error bookkeeping and the result are float32 either way.
    """
    dtype = torch.float16 if groups.dtype == torch.float16 else torch.float32
    w = groups.float()
    maxq = (1 << bits) - 1
    lo, hi = w.amin(1), w.amax(1)
    span = hi - lo
    inv = torch.where(span > 1e-4, maxq / span.clamp(min=1e-12), torch.ones_like(span)).clamp(max=2e4)[:, None]
    scale = 1.0 / inv
    scaled = (w * inv).to(dtype)  # w/s: fixed, since only the zero-point moves
    zero = (-lo[:, None] * inv).to(dtype)
    del w
    # the threshold |e·s|^(p−1)/β in grid units is |e|^(p−1) · s^(p−2)/β; a float32 log (fp16-safe)
    log_factor = (settings.lp_norm - 2) * scale.log() - math.log(settings.beta)
    weight = scale.view(-1) / scale.numel()  # mean |w − ŵ| = Σ_groups s · mean|e| / G
    best_err, best_zero = float("inf"), zero
    e, q, a = torch.empty_like(scaled), torch.empty_like(scaled), torch.empty_like(scaled)  # reused buffers
    stopping = False
    for step in range(settings.iters + 1):
        torch.add(scaled, zero, out=e)
        e.sub_(torch.round(e, out=q).clamp_(0, maxq))  # grid-unit error w/s + z − q
        torch.abs(e, out=a)
        mean_abs = float(a.mean(1, dtype=torch.float32) @ weight)
        improved = mean_abs < best_err
        if improved:
            best_err, best_zero = mean_abs, zero
        elif stopping:  # the step after the first non-improvement was tried too (HQQ keeps it blindly)
            break
        if step == settings.iters:
            break
        stopping = not improved
        # exp/log instead of pow: several times faster on the CPU; |e| = 0 gives t = inf, which clamps nothing
        t = a.log_().mul_(settings.lp_norm - 1).add_(log_factor).exp_()
        t = torch.minimum(torch.abs(e, out=q), t, out=t)
        zero = zero - t.copysign_(e).mean(1, keepdim=True)
        log_factor = log_factor - math.log(settings.kappa)
    return scale.view(-1), best_zero.float().view(-1)
