"""The fastest a decode GEMV could be: the time to stream a format's bytes from HBM and nothing else.

    python benchmarks/read_floor.py [--shapes 7b] [--formats "scalar 2-bit g128,E8P 2-bit"]

For each shape and storage format, a read-only kernel streams exactly the format's stored bytes (codes,
scales, zeros: the buffers `random_buffers` makes, as `gemv_speed.py` times them) with 16-byte
non-allocating loads and folds them into one word, under the method of `gemv_speed.py` (copies over more than
4× the L2, graph replays). Every launch shape of a small set (blocks per SM × loads in flight per thread) is
timed and the best kept, so the floor is that of a kernel that does no decoding, no multiply and no reduction.
An empty kernel (no loads) gives the fixed cost of one launch inside the graph. cuBLAS FP16 on the same shape
is timed in the same run; "ceiling" is cuBLAS over the floor: no decoder of that format can beat it.
"""

from __future__ import annotations

import argparse
import functools

import numpy as np
import torch
from gemv_speed import FORMATS, copies_for, graph_time, shapes_of, time_fp16  # this folder is on sys.path

from harpq.kernels import nvrtc

SOURCE = r"""
typedef unsigned int u32;
struct Words { u32 x, y, z, w; };
// U loads of 16 bytes in flight per thread before any is used; grid-stride over the buffer
extern "C" __global__ void read_floor(const Words* __restrict__ p, long long n, u32* out) {
    u32 acc = 0;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += U * stride) {
        Words v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const long long j = i + u * stride;
            if (j < n)
                asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                             : "=r"(v[u].x), "=r"(v[u].y), "=r"(v[u].z), "=r"(v[u].w) : "l"(p + j));
            else
                v[u] = Words{0, 0, 0, 0};
        }
#pragma unroll
        for (int u = 0; u < U; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    if (acc == 0x9e3779b9u) out[0] = acc;  // keeps the loads; almost never taken
}

extern "C" __global__ void empty_kernel(u32* out) {
    if (threadIdx.x == 1024) out[0] = 0;  // never taken
}
"""

THREADS = 256


@functools.cache
def _kernel(entry: str, unroll: int):
    from cuda.core import Device, Program, ProgramOptions

    Device(torch.cuda.current_device()).set_current()
    major, minor = torch.cuda.get_device_capability()
    options = ProgramOptions(arch=f"sm_{major}{minor}", std="c++17", define_macro=[("U", str(unroll))])
    return Program(SOURCE, code_type="c++", options=options).compile("cubin").get_kernel(entry)


def _launch(kern, grid: int, *args) -> None:
    nvrtc.launch(kern, grid, THREADS, *args)  # on torch's stream, as the decode kernels


def read_time(nbytes: int, gen: torch.Generator) -> tuple[float, str]:
    """Best seconds per call, over launch shapes, to stream nbytes (rounded up to 16) from HBM."""
    n16 = -(-nbytes // 16)
    copies = copies_for(n16 * 16)
    bufs = [torch.randint(0, 2**31, (n16 * 4,), dtype=torch.int32, device="cuda", generator=gen)
            for _ in range(copies)]
    out = torch.zeros(1, dtype=torch.int32, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    best = (float("inf"), "")
    for unroll in (1, 2, 4, 8):
        grids = {sms * b for b in (1, 2, 4, 8)} | {-(-n16 // (THREADS * unroll))}  # persistent, or one pass
        for grid in sorted(grids):
            kern = _kernel("read_floor", unroll)
            t = graph_time(lambda i, kern=kern, grid=grid: _launch(
                kern, grid, np.uint64(bufs[i].data_ptr()), np.int64(n16), np.uint64(out.data_ptr())), copies)
            best = min(best, (t, f"grid {grid}, {unroll} loads in flight"))
    return best


def empty_time() -> float:
    out = torch.zeros(1, dtype=torch.int32, device="cuda")
    kern = _kernel("empty_kernel", 1)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return graph_time(lambda i: _launch(kern, sms, np.uint64(out.data_ptr())), 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="7b")
    parser.add_argument("--formats", default="scalar 4-bit g128,hqq 4-bit g64,scalar 2-bit g128,E8P 2-bit,"
                                             "E8P+E8P 4-bit,QTIP 3INST 2-bit")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"empty kernel in the graph: {empty_time() * 1e6:.2f} µs per launch", flush=True)
    rows = []
    for group in args.shapes.split(","):
        for m, n in shapes_of(group):
            fp16 = time_fp16(m, n, 1, gen)
            fp16_floor, how = read_time(m * n * 2, gen)
            rows.append((f"{m}×{n}", "fp16 weights", m * n * 2, fp16_floor, fp16, how))
            print(rows[-1], flush=True)
            for name in [f for f in args.formats.split(",") if f]:
                bufs = FORMATS[name].random_buffers(m, n, gen, "cuda")
                nbytes = sum(t.numel() * t.element_size() for t in bufs.values())
                del bufs
                floor, how = read_time(nbytes, gen)
                rows.append((f"{m}×{n}", name, nbytes, floor, fp16, how))
                print(rows[-1], flush=True)
            torch.cuda.empty_cache()
    print("\n| shape | bytes of | MB | read floor µs | cuBLAS FP16 batch 1 µs | ceiling (× cuBLAS) | best launch |")
    print("|---|---|---|---|---|---|---|")
    for shape, name, nbytes, floor, fp16, how in rows:
        print(f"| {shape} | {name} | {nbytes / 1e6:.2f} | {floor * 1e6:.1f} | {fp16 * 1e6:.1f} | "
              f"{fp16 / floor:.2f}× | {how} |")


if __name__ == "__main__":
    main()
