"""Decode GEMV time (batch 1) of the Triton kernels against an FP16 matmul, Llama-2-7B linear shapes.

    python benchmarks/gemv_speed.py

Random codes (their values do not change the time); CUDA events over graph replays of 20 calls each
(host launch overhead excluded: that is what the decode engine's CUDA graph removes too).
Bandwidth = bytes of the stored weight (codes + scales) / time.
"""

from __future__ import annotations

import functools

import torch
from harpq.kernels.dispatch import kernel_meta, quantized_matmul

from harpq.codebooks import ScalarGrid
from harpq.codebooks.quipsharp import E8PCodebook
from harpq.kernels.stages import StagePlan, apply_plan
from harpq.processors import make_processor
from harpq.rounding import nearest

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]


def cuda_time(fn, repeat: int = 20, replays: int = 10) -> float:
    """GPU time per call: `repeat` calls captured in one CUDA graph (no host launch overhead), replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # autotuning and compilation happen here
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (repeat * replays) / 1e3


def main() -> None:
    dev = "cuda"
    print(f"{torch.cuda.get_device_name()}, batch 1")
    print("| shape | format | µs | GB/s | vs fp16 |")
    print("|---|---|---|---|---|")
    for m, n in SHAPES:
        w = torch.randn(m, n, device=dev) * 0.02
        x = torch.randn(1, n, device=dev, dtype=torch.float16)
        wh = w.half()
        t16 = cuda_time(functools.partial(torch.matmul, x, wh.T))
        print(f"| {m}×{n} | fp16 | {t16 * 1e6:.1f} | {m * n * 2 / t16 / 1e9:.0f} | 1.00 |")
        for name, cb in (("scalar 4-bit g128", ScalarGrid(4, 128)), ("scalar 2-bit g128", ScalarGrid(2, 128)),
                         ("hqq 4-bit g64", ScalarGrid(4, 64, scale="hqq")), ("e8p 2-bit", E8PCodebook(2)),
                         ("e8p rvq 4-bit", E8PCodebook(4))):
            state = cb.prepare(w)
            codes, _ = nearest(w, cb, state)
            buffers = cb.encode(codes, state)
            meta = kernel_meta(cb, buffers, m, n)
            t = cuda_time(functools.partial(quantized_matmul, cb, buffers, meta, x, m, n))
            nbytes = sum(b.numel() * b.element_size() for b in buffers.values())
            print(f"| {m}×{n} | {name} | {t * 1e6:.1f} | {nbytes / t / 1e9:.0f} | {t16 / t:.2f} |", flush=True)
    print("| size | online transform | µs |")
    print("|---|---|---|")
    for n in (4096, 11008):
        x = torch.randn(1, n, device=dev, dtype=torch.float16)
        for name in ("rht", "harp"):
            proc = make_processor({"name": name, "seed": 0, "schedule": "kron"} if name == "harp"
                                  else {"name": name, "seed": 0})
            buffers = {k: v.to(dev) for k, v in proc.init_buffers(n, n).items()}
            side = proc.side("in", n)
            plan = StagePlan.build(*side.stages(buffers, "v_"))
            t = cuda_time(functools.partial(apply_plan, plan, x, False))
            print(f"| {n} | {name} {plan.table[0::4]} | {t * 1e6:.1f} |", flush=True)


def chosen_configs() -> None:
    """Which tile the autotuner picked per shape key."""
    from harpq.kernels.e8p_gemv import _e8p_gemv
    from harpq.kernels.scalar_gemv import _grouped_gemv

    for name, kernel in (("e8p", _e8p_gemv), ("scalar", _grouped_gemv)):
        for key, config in getattr(kernel, "cache", {}).items():
            print(f"{name} {key[:4]}: {config}")


if __name__ == "__main__":
    main()
    chosen_configs()
