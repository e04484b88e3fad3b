"""HQQ quantization speed for real model shapes, random weights made on the device (values do not
matter for speed), 4 bits group 64 and the float32 solver by default (`--dtype float16`: HQQ's GPU setting).

    python benchmarks/hqq_speed.py --shape llama-2-7b          # every linear of the model
    python benchmarks/hqq_speed.py --shape llama-2-70b --layers 1   # one decoder layer, extrapolated
"""

from __future__ import annotations

import argparse
import time

import torch

from harpq.codebooks import ScalarGrid
from harpq.rounding import nearest

SHAPES = {  # hidden, mlp, layers, kv heads·head dim
    "llama-2-7b": (4096, 11008, 32, 4096),
    "llama-3-8b": (4096, 14336, 32, 1024),
    "llama-2-70b": (8192, 28672, 80, 1024),
}


def layer_linears(hidden: int, mlp: int, kv: int) -> list[tuple[str, int, int]]:
    return [("q", hidden, hidden), ("k", kv, hidden), ("v", kv, hidden), ("o", hidden, hidden),
            ("gate", mlp, hidden), ("up", mlp, hidden), ("down", hidden, mlp)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-2-7b")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers to time (default: all)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="solver precision")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, mlp, total_layers, kv = SHAPES[args.shape]
    layers = args.layers or total_layers
    cb = ScalarGrid(args.bits, args.group_size, scale="hqq")
    gen = torch.Generator(device=device).manual_seed(0)
    cb.prepare(torch.randn(256, 256, device=device, generator=gen))  # warm-up
    weights = 0
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(layers):
        for _, m, n in layer_linears(hidden, mlp, kv):
            w = (torch.randn(m, n, device=device, generator=gen) * 0.02).to(getattr(torch, args.dtype))
            state = cb.prepare(w)
            codes, _ = nearest(w.float(), cb, state)  # codes on the float32 grid, as the pipeline does
            cb.encode(codes, state)
            weights += m * n
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{name}: {args.shape}, {layers} of {total_layers} decoder layers, {args.bits}-bit g{args.group_size} "
          f"{args.dtype} solver: "
          f"{seconds:.2f} s for {weights / 1e9:.2f} G weights (random-weight generation included); "
          f"whole model {seconds * total_layers / layers:.1f} s")


if __name__ == "__main__":
    main()
