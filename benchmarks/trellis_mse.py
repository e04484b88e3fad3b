"""Distortion of the bitshift trellis codes on i.i.d. N(0, 1) against QTIP's Table 1 (k = 2: 1MAD and 3INST
0.069, HYB 0.071, the distortion-rate bound 0.0625), and what tail-biting costs against a free walk.

    python benchmarks/trellis_mse.py [--L 16] [--k 2] [--sequences 64] [--T 256]
"""

from __future__ import annotations

import argparse
import time

import torch

from harpq.codebooks.trellis import quantize_tail_biting, viterbi
from harpq.formats.trellis import CODES, code_values, hyb_table, hyb_values


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--L", type=int, default=16)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--T", type=int, default=256)
    args = parser.parse_args()
    x = torch.randn(args.sequences, args.T, generator=torch.Generator().manual_seed(5))
    print(f"L = {args.L}, k = {args.k}, {args.sequences} sequences of {args.T}; bound 2^-2k = {2 ** (-2 * args.k):.4f}")
    print("| code | tail-biting MSE (k·T bits) | free walk MSE (L + (T−1)·k bits) | seconds |")
    print("|---|---|---|---|")
    for code in CODES:
        if code == "hyb":  # two weights per state from the k-means table: 2k bits shift in per step
            values, shift = hyb_values(hyb_table(), args.L), 2 * args.k
            seqs = x.reshape(args.sequences, args.T // 2, 2)
        else:
            values = code_values(code, args.L)
            values, shift, seqs = values / values.pow(2).mean().sqrt(), args.k, x  # unit RMS, as a codebook fits it
        start = time.perf_counter()
        tail = ((seqs - values[quantize_tail_biting(seqs, values, args.L, shift)]) ** 2).mean().item()
        seconds = time.perf_counter() - start
        free = ((seqs - values[viterbi(seqs, values, args.L, shift)]) ** 2).mean().item()
        print(f"| {code} | {tail:.4f} | {free:.4f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
