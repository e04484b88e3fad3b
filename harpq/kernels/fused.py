"""Small fused kernels of the decode step: RMSNorm and SiLU(gate)·up, one launch each instead of the
five or three that the eager PyTorch ops take (at batch 1 a decode step is mostly launches)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm(x_ptr, w_ptr, y_ptr, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    normed = (x * inv).to(y_ptr.dtype.element_ty)  # rounded to the model dtype before the weight, as Llama does
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(y_ptr + row * N + cols, (w * normed).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul(g_ptr, u_ptr, y_ptr, N, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N
    g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + idx, (silu * u).to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: statistics in float32, the weight applied in the model dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fused: bool) -> torch.Tensor:
    if not fused:
        return rms_norm_reference(x, weight, eps)
    x2 = x.contiguous().view(-1, x.shape[-1])
    y = torch.empty_like(x2)
    _rms_norm[(x2.shape[0],)](x2, weight, y, x2.shape[1], eps, BLOCK=triton.next_power_of_2(x2.shape[1]))
    return y.view(x.shape)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, fused: bool) -> torch.Tensor:
    if not fused:
        return torch.nn.functional.silu(gate) * up
    g, u = gate.contiguous(), up.contiguous()
    y = torch.empty_like(g)
    block = 1024
    _silu_mul[(triton.cdiv(g.numel(), block),)](g, u, y, g.numel(), BLOCK=block)
    return y


@triton.jit
def _rope_cache(q_ptr, k_ptr, v_ptr, sq, sk, sv, cos_ptr, sin_ptr, pos_ptr, qo_ptr, kc_ptr, vc_ptr, T, H, HKV, L,
                D: tl.constexpr):
    bt = tl.program_id(0)  # b·T + t
    head = tl.program_id(1)  # q heads, then k heads, then v heads
    b, t = bt // T, bt % T
    half = tl.arange(0, D // 2)
    if head < H + HKV:
        is_q = head < H
        h = tl.where(is_q, head, head - H)
        src = tl.where(is_q, q_ptr + bt * sq, k_ptr + bt * sk) + h * D
        x1 = tl.load(src + half).to(tl.float32)
        x2 = tl.load(src + D // 2 + half).to(tl.float32)
        c1, c2 = tl.load(cos_ptr + t * D + half), tl.load(cos_ptr + t * D + D // 2 + half)
        s1, s2 = tl.load(sin_ptr + t * D + half), tl.load(sin_ptr + t * D + D // 2 + half)
        o1, o2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
        if is_q:
            dst = qo_ptr + ((b * H + h) * T + t) * D
        else:
            dst = kc_ptr + ((b * HKV + h) * L + tl.load(pos_ptr + t)) * D
        tl.store(dst + half, o1.to(qo_ptr.dtype.element_ty))
        tl.store(dst + D // 2 + half, o2.to(qo_ptr.dtype.element_ty))
    else:
        h = head - H - HKV
        cols = tl.arange(0, D)
        v = tl.load(v_ptr + bt * sv + h * D + cols)
        tl.store(vc_ptr + ((b * HKV + h) * L + tl.load(pos_ptr + t)) * D + cols, v)


def rope_into_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """One launch for: rotary embedding of q (B, T, H·D) and k, k and v written into the caches
    (B, Hkv, L, D) at `pos`; returns the rotated q as (B, H, T, D). q, k, v may be column slices of one
    fused projection (rows strided, columns contiguous)."""
    b, t, _ = q.shape
    hkv, length, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    heads = q.shape[-1] // d
    q_out = torch.empty(b, heads, t, d, dtype=q.dtype, device=q.device)
    _rope_cache[(b * t, heads + 2 * hkv)](q, k, v, q.stride(1), k.stride(1), v.stride(1), cos.contiguous(),
                                          sin.contiguous(), pos, q_out, k_cache, v_cache, t, heads, hkv, length, D=d)
    return q_out
