"""Decode GEMV time of every storage format against cuBLAS FP16 and torch's int4 "tinygemm", one table.

    python benchmarks/gemv_speed.py [--shapes 7b,70b,4096x11008] [--batch 1,4,16] [--json out.json]
    python benchmarks/gemv_speed.py --sweep      # launch shapes (MT, WARPS, UNROLL) per format, shape, batch
    python benchmarks/gemv_speed.py --pdl both   # each format with and without programmatic dependent launch
    python benchmarks/gemv_speed.py --variants "STAGES=0;STAGES=4"   # launch-shape settings side by side

Method: each implementation gets enough copies of its weights to span more than 4× the L2 cache, and the
timed CUDA graph cycles through them, so every call streams its matrix from HBM as a decode step does
(a repeated call on one buffer would be served from L2). A graph of `calls` launches is replayed; the time
per call is the median of several replays over the number of calls. Codes are random (their values do not
change the work); scales are random and positive. Peers in the same run: cuBLAS FP16 (`F.linear`, fp16)
and `torch.ops.aten._weight_int4pack_mm` (int4, group 128, bf16 activations: torchao's and gpt-fast's
kernel, shipped inside PyTorch).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from harpq.formats import E8PStages, ScalarGroups, TrellisTiles
from harpq.kernels import nvrtc, select, tuning

SHAPES = {
    "7b": [(4096, 4096), (12288, 4096), (11008, 4096), (4096, 11008)],
    "sweep": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "70b": [(8192, 8192), (10240, 8192), (28672, 8192), (8192, 28672)],
}

#: name -> storage format (the formats harpq's methods write)
FORMATS = {
    "scalar 4-bit g128": ScalarGroups(4, 128, "int"),
    "hqq 4-bit g64": ScalarGroups(4, 64, "fp16"),
    "scalar 3-bit g128": ScalarGroups(3, 128, "int"),
    "scalar 2-bit g128": ScalarGroups(2, 128, "int"),
    "E8P 2-bit": E8PStages(2, None, row_tile=0),  # as the e8p codebook stores it (rows: faster at 2 bits)
    "E8P+E8 3-bit": E8PStages(3, 2.04),
    "E8P+E8P 4-bit": E8PStages(4, 3.45),
    "QTIP 3INST 2-bit": TrellisTiles(2, 16, "3inst"),
    "QTIP 1MAD 2-bit": TrellisTiles(2, 16, "1mad"),
    "QTIP 3INST 3-bit": TrellisTiles(3, 16, "3inst"),
    "QTIP 3INST 4-bit": TrellisTiles(4, 16, "3inst"),
}


def shapes_of(name: str) -> list[tuple[int, int]]:
    """A named group of shapes, or one shape written MxK."""
    if name in SHAPES:
        return SHAPES[name]
    m, _, k = name.partition("x")
    if not (m.isdigit() and k.isdigit()):
        raise SystemExit(f"unknown shape {name!r}: one of {', '.join(SHAPES)} or MxK such as 4096x11008")
    return [(int(m), int(k))]


def graph_time(fn: Callable[[int], object], copies: int, calls: int = 200, replays: int = 7) -> float:
    """Seconds per call of fn(i % copies), from replays of a CUDA graph of `calls` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):  # compilation, allocator warm-up
            fn(i % copies)
    torch.cuda.current_stream().wait_stream(stream)
    calls = max(calls, copies)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % copies)
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    del graph
    return statistics.median(times)


def copies_for(nbytes: int) -> int:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, math.ceil(4 * l2 / nbytes) + 1)


def time_fp16(m: int, n: int, batch: int, gen: torch.Generator) -> float:
    copies = copies_for(m * n * 2)
    ws = [torch.randn(m, n, device="cuda", generator=gen).mul_(0.02).half() for _ in range(copies)]
    x = torch.randn(batch, n, device="cuda", generator=gen).half()
    return graph_time(lambda i: F.linear(x, ws[i]), copies)


def time_tinygemm(m: int, n: int, batch: int, gen: torch.Generator) -> float | None:
    group, copies = 128, copies_for(m * n // 2)
    try:
        packed = [torch.ops.aten._convert_weight_to_int4pack(
            torch.randint(0, 256, (m, n // 2), dtype=torch.uint8, device="cuda", generator=gen), 8)
            for _ in range(copies)]
    except RuntimeError as e:  # an older torch wants int32 codes; report rather than guess
        print(f"tinygemm unavailable: {str(e).splitlines()[0]}")
        return None
    sz = [torch.rand(n // group, m, 2, device="cuda", generator=gen).bfloat16() for _ in range(copies)]
    x = torch.randn(batch, n, device="cuda", generator=gen).bfloat16()
    return graph_time(lambda i: torch.ops.aten._weight_int4pack_mm(x, packed[i], group, sz[i]), copies)


def time_format(fmt, m: int, n: int, batch: int, gen: torch.Generator) -> tuple[float, str]:
    one = fmt.random_buffers(m, n, gen, "cuda")
    nbytes = sum(t.numel() * t.element_size() for t in one.values())
    copies = copies_for(nbytes)
    sets = [one] + [fmt.random_buffers(m, n, gen, "cuda") for _ in range(copies - 1)]
    x = torch.randn(batch, n, device="cuda", generator=gen).half()
    backend = select(fmt, x, m, n)
    prepared = [backend.prepare(fmt, b, m, n) for b in sets]
    return graph_time(lambda i: backend.matmul(fmt, sets[i], prepared[i], x, m, n), copies), backend.name


def sweep(shapes: list[tuple[int, int]], formats: list[str], batches: list[int], gen: torch.Generator) -> None:
    """Time every launch shape; print the default's time and the best one's."""
    configs = [{"MT": mt, "WARPS": w, "UNROLL": u, "XEARLY": e} for mt in (1, 2) for w in (4, 8) for u in (1, 2, 4)
               for e in (0, 1)]
    print("| format | shape | batch | default µs | best µs | best config |")
    print("|---|---|---|---|---|---|")
    for name in formats:
        for m, n in shapes:
            for batch in batches:
                tuning.OVERRIDE.clear()
                default = time_format(FORMATS[name], m, n, batch, gen)[0]
                timed = []
                for cfg in configs:
                    tuning.OVERRIDE.update(cfg)
                    timed.append((time_format(FORMATS[name], m, n, batch, gen)[0], cfg))
                tuning.OVERRIDE.clear()
                best = min(timed, key=lambda r: r[0])
                print(f"| {name} | {m}×{n} | {batch} | {default * 1e6:.1f} | {best[0] * 1e6:.1f} | {best[1]} |",
                      flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="7b,70b")
    parser.add_argument("--batch", default="1,4,16")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--json")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--pdl", choices=["off", "on", "both"], default="off",
                        help="programmatic dependent launch of the harpq kernels (on: where it works)")
    parser.add_argument("--variants", default="",
                        help="';'-separated launch-shape settings (K=V,...) each format is timed with")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    if args.sweep:
        shapes = [s for group in args.shapes.split(",") for s in shapes_of(group)]
        sweep(shapes, [f for f in args.formats.split(",") if f], [int(b) for b in args.batch.split(",")], gen)
        return
    formats = [f for f in args.formats.split(",") if f]
    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"L2 {torch.cuda.get_device_properties(0).L2_cache_size >> 20} MB")
    for group in args.shapes.split(","):
        for m, n in shapes_of(group):
            for batch in map(int, args.batch.split(",")):
                row = {"shape": f"{m}×{n}", "batch": batch, "us": {}}
                row["us"]["cuBLAS FP16"] = time_fp16(m, n, batch, gen) * 1e6
                tg = time_tinygemm(m, n, batch, gen)
                if tg is not None:
                    row["us"]["tinygemm int4 g128"] = tg * 1e6
                for name in formats:
                    for pdl in {"off": [False], "on": [True], "both": [False, True]}[args.pdl]:
                        for variant in args.variants.split(";"):
                            nvrtc.PDL = pdl
                            tuning.OVERRIDE.clear()
                            tuning.OVERRIDE.update({k: int(v) for k, v in
                                                    (kv.split("=") for kv in variant.split(",") if kv)})
                            t, backend = time_format(FORMATS[name], m, n, batch, gen)
                            label = name if backend == "cuda" else f"{name} ({backend})"
                            label += ", PDL" if pdl and args.pdl == "both" else ""
                            label += f" [{variant}]" if variant else ""
                            row["us"][label] = t * 1e6
                    nvrtc.PDL = None
                    tuning.OVERRIDE.clear()
                torch.cuda.empty_cache()
                rows.append(row)
                base = row["us"]["cuBLAS FP16"]
                print(f"{row['shape']} b{batch}: " + "  ".join(f"{k} {v:.1f} ({base / v:.2f}×)"
                                                             for k, v in row["us"].items()), flush=True)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    names = list(rows[0]["us"])
    print("\n| shape | batch | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for row in rows:
        base = row["us"]["cuBLAS FP16"]
        cells = [f"{row['us'][k]:.1f} ({base / row['us'][k]:.2f}×)" if k in row["us"] else "–" for k in names]
        print(f"| {row['shape']} | {row['batch']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
