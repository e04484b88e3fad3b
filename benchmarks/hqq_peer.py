"""harpq's HQQ solver against the `hqq` package (PyPI) on the same matrices and settings, on the CPU.

    pip install --no-deps hqq termcolor einops     # the peer; --no-deps keeps the CPU torch
    python benchmarks/hqq_peer.py

Both: axis 1 (groups along in_features), group 64, l_p 0.7, β 10, κ 1.01, 20 iterations, zero-point
initialised unrounded, scale and zero stored in fp16. Error is measured on the dequantized weights;
time covers solving, rounding and bit-packing (harpq) or HQQ's quantize with bitpack=True.
"""

from __future__ import annotations

import time

import torch
from safetensors.torch import load_file

from harpq.codebooks import ScalarGrid
from harpq.rounding import nearest


def harpq_hqq(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    cb = ScalarGrid(bits, group, scale="hqq")
    state = cb.prepare(w)
    codes, _ = nearest(w, cb, state)
    return cb.decode(cb.encode(codes, state), *w.shape)


def peer_hqq(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    from hqq.core.quantize import Quantizer

    q, meta = Quantizer.quantize(w, nbits=bits, group_size=group, axis=1, optimize=True, round_zero=False,
                                 bitpack=True, compute_dtype=torch.float32, device="cpu")
    # store scale and zero in fp16, as harpq does (and as HQQ does with its usual fp16 compute dtype)
    meta["scale"], meta["zero"] = meta["scale"].half().float(), meta["zero"].half().float()
    return Quantizer.dequantize(q, meta).reshape(w.shape).float()


def best_time(fn, repeat: int = 3) -> tuple[float, torch.Tensor]:
    out, best = None, float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    torch.manual_seed(0)
    small = load_file("../shared/models/llama-small/model.safetensors")
    mats = {
        "student-t(3) 4096x4096": torch.distributions.StudentT(torch.tensor(3.0)).sample((4096, 4096)) * 0.02,
        "llama-small layers.3.mlp.down_proj": small["model.layers.3.mlp.down_proj.weight"].float()[:, :1344],
        "llama-small layers.3.self_attn.q_proj": small["model.layers.3.self_attn.q_proj.weight"].float(),
    }
    print(f"CPU, {torch.get_num_threads()} threads, group 64, axis 1")
    print("| matrix | bits | harpq mean abs err | hqq mean abs err | harpq l_0.7 | hqq l_0.7 | harpq s | hqq s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, w in mats.items():
        for bits in (2, 3, 4):
            t_ours, ours = best_time(lambda w=w, bits=bits: harpq_hqq(w, bits, 64))
            t_peer, peer = best_time(lambda w=w, bits=bits: peer_hqq(w, bits, 64))
            e = [float((w - r).abs().mean()) for r in (ours, peer)]
            lp = [float((w - r).abs().pow(0.7).mean()) for r in (ours, peer)]
            print(f"| {name} | {bits} | {e[0]:.6f} | {e[1]:.6f} | {lp[0]:.5f} | {lp[1]:.5f} | "
                  f"{t_ours:.3f} | {t_peer:.3f} |")


if __name__ == "__main__":
    main()
