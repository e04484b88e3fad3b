"""The per-launch floor of a CUDA-graph decode step: how long a chain of dependent tiny kernels takes.

    python benchmarks/launch_floor.py

A decode step is a chain of dependent kernels; however little each one does, the GPU spends a fixed
time per kernel (drain, launch, ramp-up). This measures that time for Triton kernels replayed from one
CUDA graph: a kernel touching one element, and one reading and writing a 4096-element fp16 vector
(the size of a transform or a norm at Llama-2-7B's width). Multiplied by the launches of a layer, it is
the part of a step no kernel speed-up removes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gemv_speed import graph_time  # the same graph-replay timer (this folder is on sys.path)


@triton.jit
def _bump(x_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + i, mask=i < n)
    tl.store(x_ptr + i, v + 1, mask=i < n)


def per_launch(n: int, chain: int = 200, replays: int = 20) -> float:
    """Seconds per kernel in a graph of `chain` dependent launches over an n-element fp16 vector."""
    x = torch.zeros(n, device="cuda", dtype=torch.float16)
    block = min(1024, triton.next_power_of_2(n))
    return graph_time(lambda i: _bump[(triton.cdiv(n, block),)](x, n, BLOCK=block), 1, calls=chain, replays=replays)


def main() -> None:
    print(f"{torch.cuda.get_device_name()}: dependent Triton launches replayed from one CUDA graph")
    print("| kernel | µs per launch |")
    print("|---|---|")
    for n in (1, 4096, 11008):
        print(f"| read + write {n} fp16 | {per_launch(n) * 1e6:.2f} |", flush=True)


if __name__ == "__main__":
    main()
