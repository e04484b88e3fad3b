// Shared pieces of the decode GEMVs: fp16x2 arithmetic, bit tricks, loads and the tensor-core step.
//
// Every decode GEMV computes y (B × M) = x (B × K) · Ŵᵀ with the same tile: a warp owns 16 output rows
// and a slice of K, decodes the weights it reads straight into the A fragments of
// mma.m16n8k16 (fp16 in, fp32 accumulate), and takes the batch as the N dimension (8 rows per n-tile),
// so each weight is decoded once for up to 16 batch rows. Within a k-tile, thread (g, t) supplies the
// weights of rows g and g+8 and the activations of batch row g for the same four k-slots; which four
// columns those are is the format's choice (a dot product does not care about the order of k), so each
// format pairs columns the way its bits fall and permutes the activations to match.
//
// No CUDA headers are included: the kernels compile with NVRTC alone (the CI compiles them on a
// machine without a GPU).

#pragma once

typedef unsigned int u32;
typedef unsigned short u16;

#define DEVICE __device__ __forceinline__

// (a & mask) | c: place bit fields into fp16 mantissas under a fixed exponent
DEVICE u32 lop_and_or(u32 a, u32 mask, u32 c) {
    u32 r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(mask), "r"(c));
    return r;
}

DEVICE u32 hfma2(u32 a, u32 b, u32 c) {
    u32 r;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

DEVICE u32 hmul2(u32 a, u32 b) {
    u32 r;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}

DEVICE u32 hsub2(u32 a, u32 b) {
    u32 r;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}

DEVICE u32 prmt(u32 a, u32 b, u32 sel) {
    u32 r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
    return r;
}

// bits [shift, shift + 32) of the 64-bit value hi:lo
DEVICE u32 funnel(u32 lo, u32 hi, u32 shift) {
    u32 r;
    asm("shf.r.clamp.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(lo), "r"(hi), "r"(shift));
    return r;
}

DEVICE float half_to_float(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

DEVICE u16 float_to_half(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// Weights are read once: keep them out of L1. Activations and tables are re-read by every warp: cached.
DEVICE void load_stream(const u32* p, u32* r, int n) {
    if (n == 4) {
        asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "l"(p));
    } else if (n == 2) {
        asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "l"(p));
    } else {
        for (int i = 0; i < n; ++i)
            asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(r[i]) : "l"(p + i));
    }
}

// n words (a multiple of 2) from p, or zeros where `pred` is false (a batch row that does not exist)
DEVICE void load_cached(const u32* p, u32* r, int n, bool pred) {
    for (int i = 0; i < n; ++i) r[i] = 0u;
    const u32 on = pred;
    int i = 0;
    for (; i + 4 <= n; i += 4)
        asm volatile("{ .reg .pred p; setp.ne.u32 p, %5, 0;\n"
                     " @p ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4]; }"
                     : "+r"(r[i]), "+r"(r[i + 1]), "+r"(r[i + 2]), "+r"(r[i + 3]) : "l"(p + i), "r"(on));
    for (; i + 2 <= n; i += 2)
        asm volatile("{ .reg .pred p; setp.ne.u32 p, %3, 0;\n"
                     " @p ld.global.nc.v2.u32 {%0, %1}, [%2]; }"
                     : "+r"(r[i]), "+r"(r[i + 1]) : "l"(p + i), "r"(on));
}

// c += A · B for one 16×16 weight tile (a0..a3, rows g/g+8) and one 16×8 activation tile (b0, b1)
DEVICE void mma16816(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Sums the per-warp partial results of a 16-row tile and writes y[n][row] (fp16) for n < batch.
// acc[nt*4 + c]: c = 0, 1 -> row g, batch 2t, 2t+1; c = 2, 3 -> row g+8 (mma's C layout).
template <int NWARPS, int NTILES>
DEVICE void reduce_and_store(const float* acc, float* red, float scale, u16* y, int row0, int M, int batch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int v = 0; v < NTILES * 4; ++v) red[(warp * NTILES * 4 + v) * 32 + lane] = acc[v];
    __syncthreads();
    if (warp != 0) return;
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int v = 0; v < NTILES * 4; ++v) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < NWARPS; ++w) s += red[(w * NTILES * 4 + v) * 32 + lane];
        const int row = row0 + g + ((v & 3) >= 2 ? 8 : 0);
        const int n = (v >> 2) * 8 + 2 * t + (v & 1);
        if (row < M && n < batch) y[(long long)n * M + row] = float_to_half(s * scale);
    }
}
