"""Run each decode GEMV a few times outside a graph so that Nsight Compute can profile it.

    ncu --clock-control none --kernel-name regex:harpq --section SpeedOfLight --section Occupancy \
        --section WarpStateStats python benchmarks/gemv_ncu.py [--formats ...] [--shapes 12288x4096,...]

Each call reads a fresh copy of the weights (the L2 holds none of them), as in `gemv_speed.py`.
"""

from __future__ import annotations

import argparse

import torch
from gemv_speed import FORMATS

from harpq.kernels import select


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--formats", default="scalar 2-bit g128,E8P 2-bit")
    parser.add_argument("--shapes", default="4096x4096,12288x4096")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--calls", type=int, default=2)
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name in args.formats.split(","):
        fmt = FORMATS[name]
        for shape in args.shapes.split(","):
            m, n = map(int, shape.split("x"))
            x = torch.randn(args.batch, n, device="cuda", generator=gen).half()
            backend = select(fmt, x, m, n)
            for _ in range(args.calls):
                buffers = fmt.random_buffers(m, n, gen, "cuda")
                backend.matmul(fmt, buffers, backend.prepare(fmt, buffers, m, n), x, m, n)
            torch.cuda.synchronize()
            print(f"{name} {m}×{n} b{args.batch}: {args.calls} calls ({backend.name})", flush=True)


if __name__ == "__main__":
    main()
