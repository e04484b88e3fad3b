"""Speed of the fast Hadamard transform against the dense matrix product, on the current device.

    python benchmarks/hadamard_speed.py                 # (4096, 11008) and friends, CPU unless CUDA is there

The fast path is O(n log n + nK) per vector (FWHT over 2^k, dense K×K); the dense one is O(n²).
"""

from __future__ import annotations

import argparse
import time

import torch

from harpq.hadamard import hadamard_matrix_tensor, hadamard_transform, split_order


def timed(fn, repeat: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 11008, 14336, 1376])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}, {torch.get_num_threads()} threads, float32, batch of {args.rows} vectors")
    print("| n | K·2^k | fast (s) | dense matmul (s) | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|")
    for n in args.sizes:
        k, p = split_order(n)
        x = torch.randn(args.rows, n, device=device)
        dense = hadamard_matrix_tensor(n, torch.float32).to(device)
        fast_s = timed(lambda x=x: hadamard_transform(x), args.repeat)
        dense_s = timed(lambda x=x, dense=dense: x @ dense.T, args.repeat)
        diff = float((hadamard_transform(x) - x @ dense.T).abs().max())
        print(f"| {n} | {k}·{p} | {fast_s:.4f} | {dense_s:.4f} | {dense_s / fast_s:.1f}× | {diff:.1e} |")


if __name__ == "__main__":
    main()
