// y = x · Ŵᵀ for packed b-bit scalar grids with a scale and a zero-point per group of a row
// (RTN/GPTQ: integer zeros; HQQ: fp16 zeros; QuIP: one scale per matrix, zero (2^b − 1)/2), batch 1–16.
//
// Compile-time configuration (NVRTC -D): BITS (1, 2, 3, 4, 8), INT_ZERO (1: zero-points are integers),
// NW (32-bit words of a row each thread reads per step: 1, 2, 4; 3 for BITS 3), NT (n-tiles of 8 batch
// rows: 1 or 2), WARPS (warps per block, splitting K), UNROLL (steps whose loads are issued together).
//
// Layout read as stored (harpq's bit stream: 32 codes fill exactly BITS words, lowest bits first); the
// per-group scales and zeros come as one half2 (scale, zero) per (group, row), group-major, so that a
// warp's 16 rows of one group are 64 contiguous bytes.
//
// Decode, two codes at a time (about 1 integer and 1 fp16 operation per weight): one lop3 moves codes
// j and j + P/2 of a word (P codes per word; 16 bits apart) into the mantissas of the half2
// (1024 + c·2^o, 1024 + c'·2^o) (bit offset o ≤ 9, else from the word shifted by 8); one fma by
// (2^−o, −1024·2^−o − z) gives (c − z) exactly for integer z (c exactly for fp16 z); one multiply by
// the scale (an fma with −z·s for fp16 z) gives the weight, rounded once to fp16. The activations of
// the pair's two columns are brought together by one prmt per pair and batch tile.

#include "gemv_common.cuh"

#if BITS == 3
constexpr int RUN = 32;  // a thread reads 3 words = 32 codes
#else
constexpr int PER = 32 / BITS;  // codes per word
constexpr int RUN = NW * PER;
#endif
constexpr int STEP = 4 * RUN;  // columns of one step of a warp (4 threads per row)

// -2^(10 - o) and 2^-o as half2
__host__ __device__ constexpr u32 neg_magic(int o) { return (0x8000u | u32(25 - o) << 10) * 0x10001u; }
__host__ __device__ constexpr u32 pow2_neg(int o) { return (u32(15 - o) << 10) * 0x10001u; }

struct RowMeta {
    u32 scale;   // (s, s)
    u32 zero;    // (z, z)
    u32 nzs;     // −(z·s) in fp16 (fp16 zeros)
};

DEVICE RowMeta row_meta(u32 m) {
    RowMeta r;
    r.scale = prmt(m, m, 0x1010);
    r.zero = prmt(m, m, 0x3232);
    r.nzs = hmul2(r.zero, r.scale) ^ 0x80008000u;
    return r;
}

// code pair at mantissa offset o of `src` -> weight pair (fp16x2)
DEVICE u32 dequant(u32 src, int o, const RowMeta& m) {
    const u32 v = lop_and_or(src, ((1u << BITS) - 1) * 0x10001u << o, 0x64006400u);
#if INT_ZERO
    const u32 cz = hfma2(v, pow2_neg(o), hsub2(neg_magic(o), m.zero));  // c − z, exact
    return hmul2(cz, m.scale);
#else
    const u32 c = hfma2(v, pow2_neg(o), neg_magic(o));  // c, exact
    return hfma2(c, m.scale, m.nzs);
#endif
}

#if BITS == 3
// pair j = (code j, code j + 16) of the 96-bit run w0..w2: four 32-bit windows hold codes
// (0–4 | 16–20), (5–9 | 21–25), (10–14 | 26–30), (15 | 31), 3 bits apart, the second group 16 bits up
DEVICE void windows3(const u32* w, u32* m) {
    m[0] = prmt(w[0], funnel(w[1], w[2], 16), 0x5410);
    m[1] = prmt(funnel(w[0], w[1], 15), funnel(w[1], w[2], 31), 0x5410);
    m[2] = prmt(funnel(w[0], w[1], 30), w[2] >> 14, 0x5410);
    m[3] = prmt(w[1] >> 13, w[2] >> 29, 0x5410);
}

DEVICE u32 pair3(const u32* m, const u32* m8, int j, const RowMeta& meta) {
    const int q = j < 15 ? j / 5 : 3;
    const int pos = 3 * (j - 5 * q);
    return pos + 3 <= 10 ? dequant(m[q], pos, meta) : dequant(m8[q], pos - 8, meta);
}
#else
DEVICE u32 pair(u32 w, u32 w8, int j, const RowMeta& meta) {
    const int o = BITS * j;
    return o + BITS <= 10 ? dequant(w, o, meta) : dequant(w8, o - 8, meta);
}
#endif

// activations of columns (j, j + half) from the raw pairs xr[i] = (x_2i, x_2i+1)
DEVICE u32 xpair(const u32* xr, int j, int half) {
    return prmt(xr[j / 2], xr[(j + half) / 2], (j & 1) ? 0x7632 : 0x5410);
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
harpq_scalar_gemv(const u32* __restrict__ x, int batch, const u32* __restrict__ codes, int row_words,
                  const u32* __restrict__ meta, int group_shift, u16* __restrict__ y, int M, int K) {
    __shared__ float red[WARPS * NT * 4 * 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * 16;
    const int ra = row0 + g, rb = ra + 8;
    const bool va = ra < M, vb = rb < M;
    const int nsteps = K / STEP;
    const u32* ca = codes + (long long)(va ? ra : 0) * row_words + t * NW;
    const u32* cb = codes + (long long)(vb ? rb : 0) * row_words + t * NW;
    const u32* xrow[NT];
    bool xv[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        xv[nt] = g + 8 * nt < batch;
        xrow[nt] = x + (long long)(xv[nt] ? g + 8 * nt : 0) * (K / 2) + t * (RUN / 2);
    }
    float acc[NT * 4];
#pragma unroll
    for (int i = 0; i < NT * 4; ++i) acc[i] = 0.f;

    for (int s0 = warp; s0 < nsteps; s0 += WARPS * UNROLL) {
        u32 wa[UNROLL][NW], wb[UNROLL][NW], ma[UNROLL], mb[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int s = s0 + u * WARPS;
            if (s < nsteps) {
                load_stream(ca + s * 4 * NW, wa[u], NW);
                load_stream(cb + s * 4 * NW, wb[u], NW);
                const int gi = (4 * s + t) >> group_shift;  // runs per group: a power of two (or all)
                ma[u] = va ? meta[(long long)gi * M + ra] : 0u;
                mb[u] = vb ? meta[(long long)gi * M + rb] : 0u;
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int s = s0 + u * WARPS;
            if (s >= nsteps) break;
            const RowMeta mta = row_meta(ma[u]), mtb = row_meta(mb[u]);
#if BITS == 3
            u32 xr[NT][16];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) load_cached(xrow[nt] + s * (STEP / 2), xr[nt], 16, xv[nt]);
            u32 pa[4], pb[4], pa8[4], pb8[4];
            windows3(wa[u], pa);
            windows3(wb[u], pb);
#pragma unroll
            for (int q = 0; q < 4; ++q) { pa8[q] = pa[q] >> 8; pb8[q] = pb[q] >> 8; }
#pragma unroll
            for (int kt = 0; kt < 8; ++kt) {
                const u32 a0 = pair3(pa, pa8, 2 * kt, mta), a2 = pair3(pa, pa8, 2 * kt + 1, mta);
                const u32 a1 = pair3(pb, pb8, 2 * kt, mtb), a3 = pair3(pb, pb8, 2 * kt + 1, mtb);
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
                    mma16816(acc + 4 * nt, a0, a1, a2, a3, xpair(xr[nt], 2 * kt, 16), xpair(xr[nt], 2 * kt + 1, 16));
            }
#else
#pragma unroll
            for (int i = 0; i < NW; ++i) {
                u32 xr[NT][PER / 2];
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
                    load_cached(xrow[nt] + s * (STEP / 2) + i * (PER / 2), xr[nt], PER / 2, xv[nt]);
                const u32 a = wa[u][i], b = wb[u][i], a8 = a >> 8, b8 = b >> 8;
#pragma unroll
                for (int kt = 0; kt < PER / 4; ++kt) {
                    const u32 a0 = pair(a, a8, 2 * kt, mta), a2 = pair(a, a8, 2 * kt + 1, mta);
                    const u32 a1 = pair(b, b8, 2 * kt, mtb), a3 = pair(b, b8, 2 * kt + 1, mtb);
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt)
                        mma16816(acc + 4 * nt, a0, a1, a2, a3, xpair(xr[nt], 2 * kt, PER / 2),
                                 xpair(xr[nt], 2 * kt + 1, PER / 2));
                }
            }
#endif
        }
    }
    reduce_and_store<WARPS, NT>(acc, red, 1.0f, y, row0, M, batch);
}
