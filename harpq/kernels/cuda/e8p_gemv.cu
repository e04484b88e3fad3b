// y = scale · x · Ŵᵀ for QuIP#'s E8P codes (2 bits per weight) and their residual stages (3 bits: the
// 1-bit E8 codebook, 4 bits: E8P again, each added with weight 1/resid), batch 1–16.
//
// Compile-time configuration (NVRTC -D): STAGE2 (0 none, 1 E8 1-bit, 2 E8P), NW (32-bit words = 2 codes
// of a row each thread reads per step: 1, 2, 4), NT (n-tiles of 8 batch rows), WARPS, UNROLL.
//
// A 16-bit code is byte 0 = entry of the 256 absolute-value vectors, byte 1 = 7 signs and the ±¼ shift.
// Two 1 KB tables in shared memory turn it into eight 4-bit fields n = 2k + b, one per coordinate, with
// 2·w = n − 7.5 (k = (7 + 2σ|v|)/2, b the shift bit):
//   magnitudes[byte 0]: the fields of σ = + (b = 0), the eighth coordinate already negated when the
//                       entry's parity is odd;
//   signs[byte 1]:      14 in every field whose sign is negative (x ^ 14 turns k into 7 − k, i.e. −σ),
//                       the eighth sign from the parity of the seven stored ones, and b in every field.
// One xor combines them; one lop3 per pair puts a field into the mantissa of 32 (32 + n/2), and one
// subtraction of 35.75 gives the weight exactly. Fields are ordered (v0, v2, v4, v6 | v1, v3, v5, v7),
// so the pairs come out as (v0, v1), (v2, v3), ...: the activations of a pair are adjacent.

#include "gemv_common.cuh"

constexpr int RUN = NW * 16;   // columns a thread reads per step (8 per code)
constexpr int STEP = 4 * RUN;
constexpr u32 EXP32 = 0x50005000u;        // (32, 32)
constexpr u32 OFFSET = 0x50785078u;       // (35.75, 35.75)
constexpr u32 FIELDS = 0x00F000F0u;

__shared__ u32 mag[256], sgn[256];  // the two code tables, filled by each block from `tables`

// the four weight pairs of code byte pair (e, sb)
DEVICE void e8p_pairs(u32 e, u32 sb, u32* p) {
    const u32 q = mag[e] ^ sgn[sb];
    p[0] = hsub2(lop_and_or(q << 4, FIELDS, EXP32), OFFSET);
    p[1] = hsub2(lop_and_or(q, FIELDS, EXP32), OFFSET);
    p[2] = hsub2(lop_and_or(q >> 4, FIELDS, EXP32), OFFSET);
    p[3] = hsub2(lop_and_or(q >> 8, FIELDS, EXP32), OFFSET);
}

// the 8 weight pairs of the two codes in word w
DEVICE void e8p_word(u32 w, u32* p) {
    e8p_pairs(w & 0xFFu, (w >> 8) & 0xFFu, p);
    e8p_pairs((w >> 16) & 0xFFu, w >> 24, p + 4);
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
harpq_e8p_gemv(const u32* __restrict__ x, int batch, const u32* __restrict__ codes,
               const u32* __restrict__ codes2, const u32* __restrict__ tables, const u16* __restrict__ scale,
               u32 resid_inv, u16* __restrict__ y, int M, int K) {
    __shared__ float red[WARPS * NT * 4 * 32];
#if STAGE2 == 1
    __shared__ u32 e8[256 * 4];
#endif
    for (int i = threadIdx.x; i < 256; i += WARPS * 32) {
        mag[i] = tables[i];
        sgn[i] = tables[256 + i];
    }
#if STAGE2 == 1
    for (int i = threadIdx.x; i < 1024; i += WARPS * 32) e8[i] = tables[512 + i];
#endif
    __syncthreads();

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * 16;
    const int ra = row0 + g, rb = ra + 8;
    const int row_words = K / 16;
    const int nsteps = K / STEP;
    const long long oa = (long long)(ra < M ? ra : 0) * row_words + t * NW;
    const long long ob = (long long)(rb < M ? rb : 0) * row_words + t * NW;
#if STAGE2 == 1
    const int row_words2 = K / 32;  // one byte per code
    const long long oa2 = (long long)(ra < M ? ra : 0) * row_words2 * 4 + t * NW * 2;  // in bytes
    const long long ob2 = (long long)(rb < M ? rb : 0) * row_words2 * 4 + t * NW * 2;
#endif
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
        u32 wa[UNROLL][NW], wb[UNROLL][NW];
#if STAGE2 == 2
        u32 wa2[UNROLL][NW], wb2[UNROLL][NW];
#elif STAGE2 == 1
        u32 wa2[UNROLL][(NW + 1) / 2], wb2[UNROLL][(NW + 1) / 2];
#endif
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int s = s0 + u * WARPS;
            if (s < nsteps) {
                load_stream(codes + oa + s * 4 * NW, wa[u], NW);
                load_stream(codes + ob + s * 4 * NW, wb[u], NW);
#if STAGE2 == 2
                load_stream(codes2 + oa + s * 4 * NW, wa2[u], NW);
                load_stream(codes2 + ob + s * 4 * NW, wb2[u], NW);
#elif STAGE2 == 1
                if (NW == 1) {  // two code bytes: half a word
                    const u16* p2 = reinterpret_cast<const u16*>(codes2);
                    wa2[u][0] = p2[(oa2 + s * 8 * NW) / 2];
                    wb2[u][0] = p2[(ob2 + s * 8 * NW) / 2];
                } else {
                    load_stream(codes2 + (oa2 + s * 8 * NW) / 4, wa2[u], NW / 2);
                    load_stream(codes2 + (ob2 + s * 8 * NW) / 4, wb2[u], NW / 2);
                }
#endif
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int s = s0 + u * WARPS;
            if (s >= nsteps) break;
#pragma unroll
            for (int i = 0; i < NW; ++i) {
                u32 xr[NT][8];  // the word's 16 columns as 8 pairs
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) load_cached(xrow[nt] + s * (STEP / 2) + i * 8, xr[nt], 8, xv[nt]);
                u32 pa[8], pb[8];
                e8p_word(wa[u][i], pa);
                e8p_word(wb[u][i], pb);
#if STAGE2 == 2
                {
                    u32 qa[8], qb[8];
                    e8p_word(wa2[u][i], qa);
                    e8p_word(wb2[u][i], qb);
#pragma unroll
                    for (int k = 0; k < 8; ++k) {
                        pa[k] = hfma2(qa[k], resid_inv, pa[k]);
                        pb[k] = hfma2(qb[k], resid_inv, pb[k]);
                    }
                }
#elif STAGE2 == 1
                {
                    const u32 ca = (wa2[u][i / 2] >> (16 * (i & 1))) & 0xFFFFu;
                    const u32 cb = (wb2[u][i / 2] >> (16 * (i & 1))) & 0xFFFFu;
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        const u32* ta = e8 + 4 * ((ca >> (8 * c)) & 0xFFu);
                        const u32* tb = e8 + 4 * ((cb >> (8 * c)) & 0xFFu);
#pragma unroll
                        for (int k = 0; k < 4; ++k) {
                            pa[4 * c + k] = hfma2(ta[k], resid_inv, pa[4 * c + k]);
                            pb[4 * c + k] = hfma2(tb[k], resid_inv, pb[4 * c + k]);
                        }
                    }
                }
#endif
#pragma unroll
                for (int kt = 0; kt < 4; ++kt)  // two k-tiles per code
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt)
                        mma16816(acc + 4 * nt, pa[2 * kt], pb[2 * kt], pa[2 * kt + 1], pb[2 * kt + 1],
                                 xr[nt][2 * kt], xr[nt][2 * kt + 1]);
            }
        }
    }
    reduce_and_store<WARPS, NT>(acc, red, half_to_float(scale[0]), y, row0, M, batch);
}
