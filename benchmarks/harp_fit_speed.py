"""HARP fitting time for the linears of one decoder layer of a real model shape, and where it goes.

    python benchmarks/harp_fit_speed.py --shape llama-2-7b --steps 1200
    python benchmarks/harp_fit_speed.py --shape llama-2-7b --steps 100 --modules q down   # quicker
    python benchmarks/harp_fit_speed.py --shape llama-small --steps 20                    # CPU
    python benchmarks/harp_fit_speed.py --steps 150 --schedule kron --refresh 8 --store int8

Random weights and a synthetic Hessian H = Q diag(λ) Qᵀ (λ_i ∝ i^−1.2, a few outlier channels ×50:
a spectrum like a real layer input's) are made on the device. Each module is fitted as the pipeline
does (greedy schedule unless told, E8P 2-bit target, HBD on), then the per-step cost is split into the codebook
search for the target, the two-sided weight transform (forward + backward), the Hessian transform
(forward + backward) and the rest. The whole-model figure is per-layer time × layer count.
"""

from __future__ import annotations

import argparse
import time

import torch

from harpq.codebooks.quipsharp import E8PCodebook
from harpq.processors import make_processor
from harpq.processors.harp_fit import two_sided
from harpq.rounding.nearest import nearest

SHAPES = {  # hidden, mlp, layers, kv width
    "llama-small": (512, 1376, 8, 256),
    "llama-2-7b": (4096, 11008, 32, 4096),
    "llama-2-70b": (8192, 28672, 80, 1024),
}


def synthetic_hessian(n: int, device: str, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, device=device, generator=gen))
    lam = torch.arange(1, n + 1, device=device, dtype=torch.float32).pow(-1.2)
    h = (q * lam) @ q.T
    out = torch.randperm(n, device=device, generator=gen)[:4]
    h[out, :] *= 50 ** 0.5
    h[:, out] *= 50 ** 0.5
    return h


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat: int = 5) -> float:
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - start) / repeat


def breakdown(proc, m: int, n: int, w: torch.Tensor, h: torch.Tensor, codebook) -> dict[str, float]:
    """Seconds per step of each part of a fitting step, at the start parameters."""
    b = {k: v.to(w.device) for k, v in proc.init_buffers(m, n).items()}
    out_side, in_side = proc.side("out", m), proc.side("in", n)
    pu = [p.to(w.device).requires_grad_() for p in out_side.load_params(b, "u_")]
    pv = [p.to(w.device).requires_grad_() for p in in_side.load_params(b, "v_")]
    su, sv = b["u_signs"], b["v_signs"]

    def weight_fb():
        wt = two_sided(w, out_side, in_side, out_side.kernels(pu, w.device, torch.float32),
                       in_side.kernels(pv, w.device, torch.float32), su, sv)
        wt.pow(2).mean().backward()

    def hessian_fb():
        kv = in_side.kernels(pv, w.device, torch.float32)
        ht = in_side.apply(in_side.apply(h, kv, sv).T, kv, sv)
        ht.pow(2).mean().backward()

    wt = w.clone()
    return {"target": timed(lambda: nearest(wt, codebook, codebook.prepare(wt))),
            "weight fwd+bwd": timed(weight_fb), "hessian fwd+bwd": timed(hessian_fb)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-2-7b")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--modules", nargs="+", default=["q", "k", "v", "o", "gate", "up", "down"])
    ap.add_argument("--schedule", default="greedy")
    ap.add_argument("--refresh", type=int, default=1)
    ap.add_argument("--store", default="fp16")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, mlp, layers, kv = SHAPES[args.shape]
    shapes = {"q": (hidden, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, hidden),
              "gate": (mlp, hidden), "up": (mlp, hidden), "down": (hidden, mlp)}
    gen = torch.Generator(device=device).manual_seed(0)
    hessians = {n: synthetic_hessian(n, device, gen) for n in sorted({shapes[k][1] for k in args.modules})}
    codebook = E8PCodebook(args.bits)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{name}: {args.shape}, HARP {args.schedule} ({args.store}), E8P {args.bits}-bit target refreshed every "
          f"{args.refresh} step(s), {args.steps} steps per module")
    print("| module | shape | fit s | s/step | target | weight f+b | hessian f+b | start loss | best loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    total = 0.0
    for key in args.modules:
        m, n = shapes[key]
        w = torch.randn(m, n, device=device, generator=gen) * 0.02
        proc = make_processor({"name": "harp", "seed": 0, "steps": args.steps, "schedule": args.schedule,
                               "refresh": args.refresh, "store": args.store})
        b = {k: v.to(device) for k, v in proc.init_buffers(m, n).items()}
        sync()
        start = time.perf_counter()
        proc.fit(b, w, hessians[n], codebook)
        sync()
        seconds = time.perf_counter() - start
        total += seconds
        parts = breakdown(proc, m, n, w, hessians[n], codebook)
        fit = proc.last_fit
        print(f"| {key} | {m}×{n} | {seconds:.1f} | {seconds / (args.steps + 1) * 1e3:.1f} ms | "
              f"{parts['target'] * 1e3:.1f} ms | {parts['weight fwd+bwd'] * 1e3:.1f} ms | "
              f"{parts['hessian fwd+bwd'] * 1e3:.1f} ms | {fit['loss_start']:.4f} | {fit['loss_best']:.4f} |",
              flush=True)
    print(f"one decoder layer ({len(args.modules)} of 7 linears): {total:.1f} s; "
          f"whole model ({layers} layers): {total * layers / 3600 * 7 / len(args.modules):.2f} h")


if __name__ == "__main__":
    main()
