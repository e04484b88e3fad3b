// y = scale · x · Ŵᵀ for QuIP#'s E8P codes (2 bits per weight) and their residual stages (3 bits: the
// 1-bit E8 codebook, 4 bits: E8P again, each added with weight 1/resid), batch 1–16.
//
// Compile-time configuration (NVRTC -D): STAGE2 (0 none, 1 E8 1-bit, 2 E8P), NW (32-bit words = 2 codes
// of a row each thread reads per step: 1, 2, 4), TILED (codes of both stages row-tiled: 16 rows at a time,
// chunks of 32 codes of each row in turn, `formats.packing.to_row_tiles`), and the driver's MT, NT, WARPS,
// UNROLL (gemv_common.cuh).
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
// so the pairs come out as (v0, v1), (v2, v3), ...: the activations of a pair are adjacent. The 1-bit E8
// stage is one table of the same fields (n = 2v + 8, minus 36).

#include "gemv_common.cuh"

#ifndef TILED
#define TILED 0
#endif
constexpr int CHUNK = 32;  // codes of a row per chunk of the tiled layout

constexpr u32 EXP32 = 0x50005000u;    // (32, 32)
constexpr u32 OFFSET = 0x50785078u;   // (35.75, 35.75)
constexpr u32 E8_OFFSET = 0x50805080u;  // (36, 36)
constexpr u32 FIELDS = 0x00F000F0u;

__shared__ u32 mag[256], sgn[256];  // the code tables, filled by each block from `tables`
#if STAGE2 == 1
__shared__ u32 e8f[256];
#endif

// the four weight pairs of a field word q, less `offset`
DEVICE void field_pairs(u32 q, u32 offset, u32* p) {
    p[0] = hsub2(lop_and_or(q << 4, FIELDS, EXP32), offset);
    p[1] = hsub2(lop_and_or(q, FIELDS, EXP32), offset);
    p[2] = hsub2(lop_and_or(q >> 4, FIELDS, EXP32), offset);
    p[3] = hsub2(lop_and_or(q >> 8, FIELDS, EXP32), offset);
}

// table word at byte `sel` of w (prmt selector 0x444k picks byte k, zero-extended) of the table at `base`
DEVICE u32 lookup(u32 base, u32 w, u32 sel) {
    u32 r;
    asm("ld.shared.u32 %0, [%1];" : "=r"(r) : "r"(base + prmt(w, 0u, sel) * 4u));
    return r;
}

// the 8 weight pairs of the two E8P codes in word w
DEVICE void e8p_word(u32 w, u32* p) {
    const u32 m = shared_address(mag), g = shared_address(sgn);
    field_pairs(lookup(m, w, 0x4440) ^ lookup(g, w, 0x4441), OFFSET, p);
    field_pairs(lookup(m, w, 0x4442) ^ lookup(g, w, 0x4443), OFFSET, p + 4);
}

struct E8PPolicy {
    static constexpr int RUN = NW * 16;  // 8 columns per code
    static constexpr int STEP = 4 * RUN;
    const u32* codes;
    const u32* codes2;
    int K;
    u32 resid_inv;  // (1/resid, 1/resid) in fp16

    struct Step {
        u32 w[2 * MT][NW];
#if STAGE2 == 2
        u32 w2[2 * MT][NW];
#elif STAGE2 == 1
        u32 w2[2 * MT][(NW + 1) / 2];  // one byte per code
#endif
    };

    // where code e of a row is stored, in codes (a thread's codes never straddle two chunks)
    DEVICE long long code_of(int row, int e) const {
        const int row_codes = K / 8;
#if TILED
        RETURN_ROW_TILED_AT(row, e, row_codes, CHUNK)
#else
        return (long long)row * row_codes + e;
#endif
    }

    using Cursor = Rows;  // the rows are all a step's loads need
    DEVICE Rows cursor(const Rows& rows, int) const { return rows; }

    DEVICE void load(const Rows& rows, int s, int t, Step& d) const {
#pragma unroll
        for (int r = 0; r < 2 * MT; ++r) {
            const int row = rows.valid[r] ? rows.row[r] : 0;
            const long long at = code_of(row, (4 * s + t) * NW * 2);  // two codes per word
            load_stream(codes + at / 2, d.w[r], NW);
#if STAGE2 == 2
            load_stream(codes2 + at / 2, d.w2[r], NW);
#elif STAGE2 == 1
            if (NW == 1) d.w2[r][0] = reinterpret_cast<const u16*>(codes2)[at / 2];  // one byte per code
            else load_stream(codes2 + at / 4, d.w2[r], NW / 2);
#endif
        }
    }

    DEVICE void compute(const Rows&, int, int, const Step& d, const Acts& xs, float* acc) const {
        u32 xr[NT][RUN / 2];  // the step's activations, all requested before the first decode
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) xs.load(nt, 0, xr[nt], RUN / 2);
#pragma unroll
        for (int i = 0; i < NW; ++i) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                u32 p[2][8];  // rows g, g+8
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int r = 2 * mt + h;
                    e8p_word(d.w[r][i], p[h]);
#if STAGE2 == 2
                    u32 q[8];
                    e8p_word(d.w2[r][i], q);
#pragma unroll
                    for (int k = 0; k < 8; ++k) p[h][k] = hfma2(q[k], resid_inv, p[h][k]);
#elif STAGE2 == 1
                    const u32 c2 = d.w2[r][i / 2] >> (16 * (i & 1));
                    u32 q[8];
                    const u32 e = shared_address(e8f);
                    field_pairs(lookup(e, c2, 0x4440), E8_OFFSET, q);
                    field_pairs(lookup(e, c2, 0x4441), E8_OFFSET, q + 4);
#pragma unroll
                    for (int k = 0; k < 8; ++k) p[h][k] = hfma2(q[k], resid_inv, p[h][k]);
#endif
                }
#pragma unroll
                for (int kt = 0; kt < 4; ++kt)  // two k-tiles per code
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt)
                        mma_into(acc, i * 4 + kt, mt, nt, p[0][2 * kt], p[1][2 * kt], p[0][2 * kt + 1],
                                 p[1][2 * kt + 1], xr[nt][8 * i + 2 * kt], xr[nt][8 * i + 2 * kt + 1]);
            }
        }
    }
};

extern "C" __global__ void GEMV_BOUNDS
harpq_e8p_gemv(const u32* __restrict__ x, int batch, const u32* __restrict__ codes,
               const u32* __restrict__ codes2, const u32* __restrict__ tables, const u16* __restrict__ scale,
               int scale_rows, u32 resid_inv, u16* __restrict__ y, const u16* __restrict__ residual, int M, int K,
               int split_blocks, int split_q, float* __restrict__ work, u32* __restrict__ counters) {
    for (int i = threadIdx.x; i < 256; i += WARPS * 32) {
        mag[i] = tables[i];
        sgn[i] = tables[256 + i];
#if STAGE2 == 1
        e8f[i] = tables[512 + i];
#endif
    }
    __syncthreads();
    const E8PPolicy p{codes, codes2, K, resid_inv};
    // one scale for the matrix, or one per row (matrices of one scale each, stacked)
    gemv_driver(p, x, batch, y, residual, M, K, scale_rows ? 1.0f : half_to_float(scale[0]),
                TailSplit{split_blocks, split_q, work, counters}, scale_rows ? scale : nullptr);
}
