"""Where a decode step's GPU time goes: kernel time per token by kernel family, one CUDA-graph step.

    python benchmarks/decode_profile.py --shape llama-2-7b --formats fp16,quipsharp2,harp2,rtn4

Random weights of a real shape (as `harpq bench`); the step is captured in a CUDA graph and replayed
under the torch profiler. Families are recognised by kernel name; "step" is the wall time per replay,
so step − Σ kernels is the time between kernels (launch and drain).
"""

from __future__ import annotations

import argparse
import collections
import gc

import torch
from torch.profiler import ProfilerActivity, profile

from harpq.engine import bench
from harpq.engine.decoder import SHAPES
from harpq.engine.runner import DecodeRunner

FAMILIES = [  # (family, substrings of the kernel name), first match wins
    ("e8p gemv", ("harpq_e8p_gemv",)),
    ("scalar gemv", ("harpq_scalar_gemv",)),
    ("transforms: Hadamard, one launch", ("harpq_hadamard",)),
    ("transforms: stages", ("_stage",)),
    ("attention", ("flash", "fmha", "attention", "softmax", "sdpa")),
    ("sides in the step's kernels (norm / RoPE / SiLU·up / residual)", ("_rotate", "_rope_cache_mixed")),
    ("norm / rope / silu", ("_rms_norm", "_rope", "_silu")),
    ("cuBLAS (fp16 linears, lm_head)", ("gemv", "gemm", "sm90", "cutlass", "xmma", "splitK", "cublas")),
]


FAMILIES_OTHER = "other (copies, adds, argmax)"


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k.lower() in low for k in keys):
            return fam
    return FAMILIES_OTHER


def profile_step(fmt: str, shape: str, replays: int = 8,
                 others: dict[str, float] | None = None) -> tuple[dict[str, float], dict[str, int], float]:
    """Kernel µs and launches per token by family, and the step's wall µs; `others` collects the µs per token
    of each kernel no family claims, by name."""
    decoder = bench.build(SHAPES[shape], fmt)
    runner = DecodeRunner(decoder, 1, 16 + 4 * replays + 8)
    runner.prefill(torch.randint(0, decoder.shape.vocab, (1, 16), device=decoder.device))
    runner.decode(replays)  # capture and warm up
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start.record()
        runner.decode(replays)
        end.record()
        torch.cuda.synchronize()
    step_us = start.elapsed_time(end) * 1e3 / replays
    times: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA and evt.device_time > 0:
            fam = family(evt.name)
            times[fam] += evt.device_time / replays
            counts[fam] += 1
            if others is not None and fam == FAMILIES_OTHER:
                key = evt.name[:80]
                others[key] = others.get(key, 0.0) + evt.device_time / replays
    del runner, decoder
    gc.collect()
    torch.cuda.empty_cache()
    return times, {k: v // replays for k, v in counts.items()}, step_us


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-2-7b")
    ap.add_argument("--formats", default="fp16,quipsharp2,harp2,rtn4")
    args = ap.parse_args()
    names = [f for f, _ in FAMILIES] + [FAMILIES_OTHER]
    rows = {}
    for fmt in args.formats.split(","):
        others: dict[str, float] = {}
        rows[fmt] = profile_step(fmt, args.shape, others=others)
        print(fmt, {k: round(v) for k, v in rows[fmt][0].items()}, f"step {rows[fmt][2]:.0f} µs", flush=True)
        for name, us in sorted(others.items(), key=lambda kv: -kv[1])[:6]:
            print(f"    other: {us:6.0f} µs  {name}")
    print(f"\n{args.shape} on {torch.cuda.get_device_name()}, batch 1: µs of kernel time per token (kernels per token)")
    print("| family | " + " | ".join(rows) + " |")
    print("|---|" + "---|" * len(rows))
    for fam in names:
        print(f"| {fam} | " + " | ".join(f"{r[0].get(fam, 0):.0f} ({r[1].get(fam, 0)})" for r in rows.values()) + " |")
    total = (f"{sum(r[0].values()):.0f} ({sum(r[1].values())})" for r in rows.values())
    print("| Σ kernels | " + " | ".join(total) + " |")
    print("| step (wall) | " + " | ".join(f"{r[2]:.0f}" for r in rows.values()) + " |")


if __name__ == "__main__":
    main()
