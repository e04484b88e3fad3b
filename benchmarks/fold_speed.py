"""What folding a layer's RMSNorm and SiLU·up into its GEMVs saves, GEMV by GEMV, on the GPU.

    python benchmarks/fold_speed.py [--batch 1,4] [--formats "scalar 4-bit g128,hqq 4-bit g64"] [--shapes gate/up]
    python benchmarks/fold_speed.py --variants ";WARPS=2"   # launch-shape settings side by side

For the q/k/v GEMV (12288×4096 stacked) and the gate/up GEMV (22016×4096) of Llama-2-7B shapes: the norm
kernel then the GEMV (then SiLU·up), as the decode step runs them unfolded, against the one folded GEMV;
and each GEMV alone. Same method as `gemv_speed.py` (weights over 4× the L2, CUDA-graph replays); the
activations are one buffer, as in a decode step (the previous kernel just wrote them: L2).
"""

from __future__ import annotations

import argparse

import torch
from gemv_speed import FORMATS, copies_for, graph_time

from harpq.kernels import select, tuning
from harpq.kernels.fused import rms_norm, silu_mul

SHAPES = {"q/k/v 12288×4096": (12288, 4096, False), "gate/up 22016×4096": (22016, 4096, True)}


def time_variants(fmt, sets: list, m: int, n: int, glu: bool, batch: int, gen: torch.Generator) -> dict[str, float]:
    """µs per call: the GEMV alone, the norm kernel + GEMV (+ SiLU·up), and the folded GEMV."""
    x = torch.randn(batch, n, device="cuda", generator=gen).half()
    w = (torch.rand(n, device="cuda", generator=gen) + 0.5).half()
    backend = select(fmt, x, m, n)
    prep = [backend.prepare(fmt, b, m, n) for b in sets]
    extra = {"glu": True} if glu else {}
    norm = {"norm": (w, 1e-5)} if backend.folds_norm(x) else {}

    def plain(i):
        return backend.matmul(fmt, sets[i], prep[i], x, m, n)

    def unfolded(i):
        y = backend.matmul(fmt, sets[i], prep[i], rms_norm(x, w, 1e-5, True), m, n)
        return silu_mul(*y.split(m // 2, dim=-1), True) if glu else y

    def folded(i):
        if not norm:  # the norm stays its own kernel at this batch
            return backend.matmul(fmt, sets[i], prep[i], rms_norm(x, w, 1e-5, True), m, n, **extra)
        return backend.matmul(fmt, sets[i], prep[i], x, m, n, **norm, **extra)

    def glu_alone(i):
        return backend.matmul(fmt, sets[i], prep[i], x, m, n, glu=True)

    variants = [("gemv", plain), ("unfolded", unfolded), ("folded", folded)] + ([("glu", glu_alone)] if glu else [])
    return {k: graph_time(f, len(sets)) * 1e6 for k, f in variants}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,2,4")
    ap.add_argument("--formats", default="scalar 4-bit g128,hqq 4-bit g64,scalar 2-bit g128")
    ap.add_argument("--shapes", default="q/k/v,gate/up", help="which of the two GEMVs (name prefixes)")
    ap.add_argument("--variants", default="", help="';'-separated launch-shape settings (K=V,...) for every kernel")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for fname in args.formats.split(","):
        fmt = FORMATS[fname]
        for label, (m, n, glu) in SHAPES.items():
            if not any(label.startswith(p) for p in args.shapes.split(",")):
                continue
            one = fmt.random_buffers(m, n, gen, "cuda")
            copies = copies_for(sum(t.numel() * t.element_size() for t in one.values()))
            sets = [one] + [fmt.random_buffers(m, n, gen, "cuda") for _ in range(copies - 1)]
            for batch in map(int, args.batch.split(",")):
                for variant in args.variants.split(";"):
                    tuning.OVERRIDE.clear()
                    tuning.OVERRIDE.update({k: int(v) for k, v in (kv.split("=") for kv in variant.split(",") if kv)})
                    t = time_variants(fmt, sets, m, n, glu, batch, gen)
                    tuning.OVERRIDE.clear()
                    name = fname + (f" [{variant}]" if variant else "")
                    rows.append((name, label, batch, t))
                    print(name, label, batch, {k: round(v, 2) for k, v in t.items()}, flush=True)
    print(f"\n{torch.cuda.get_device_name()}: µs per call (one GEMV's work with its norm / SiLU·up)")
    print("| format | GEMV | batch | GEMV alone | GEMV with SiLU·up | norm + GEMV (+ SiLU·up) | folded | saved |")
    print("|---|---|---|---|---|---|---|---|")
    for fname, label, batch, t in rows:
        glu = f"{t['glu']:.1f}" if "glu" in t else "–"
        print(f"| {fname} | {label} | {batch} | {t['gemv']:.1f} | {glu} | {t['unfolded']:.1f} | {t['folded']:.1f} | "
              f"{t['unfolded'] - t['folded']:.1f} |")


if __name__ == "__main__":
    main()
