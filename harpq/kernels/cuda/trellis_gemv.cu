// y = scale · x · Ŵᵀ for QTIP's trellis tiles (formats/trellis.py): each 16 × 16 tile of Ŵ is one
// tail-biting walk on the (L = 16, k = BITS, V = 1) bitshift trellis, stored as its bitstream of 8·BITS
// words (most significant bit first), tiles row-block-major; batch 1–16.
//
// Compile-time configuration (NVRTC -D): BITS (k: 2, 3, 4), CODE (0: 3INST, 1: 1MAD), G (tiles along K per
// step), TPL (tiles one warp-wide load covers: 2 for BITS 2, else 1), PRESHIFT (below), and the driver's MT, NT,
// WARPS, UNROLL, XEARLY (gemv_common.cuh).
//
// A tile is one m16n8k16 A tile, and its walk visits it in fragment order: lane l = 4g + t holds weights
// 8l … 8l + 7 (rows g, g + 8; columns 4t … 4t + 3), whose states are the 16-bit windows at bits
// 8k·l + k·j (j < 8) of the cyclic bitstream: the lane's own 8k bits and the next lane's first 16 − k.
// The warp loads a tile's words one per lane and each lane gathers its two words with two shuffles.
// A state decodes with no table (QTIP §3.1): x = a·s + b (mod 2^32), then
//   3INST: (x & 0x8FFF8FFF) ^ 0x3B603B60 is two fp16 whose sum is the value;
//   1MAD:  the sum of x's four bytes, placed as fp16 (1024 + sum, −1534): again two parts summing to the
//          value (sum − 510; its 1/147.8 and the unit-RMS factor are in `scale`).
// Both parts go to the tensor cores as two k-slots with the activation duplicated, so a weight costs its
// state extraction, one IMAD and one LOP3 (3INST) and no fp16 addition.

#include "gemv_common.cuh"

constexpr int TW = 8 * BITS;       // words of a tile's bitstream
constexpr int LOADS = G / TPL;     // word loads per lane, m-tile and step

#if CODE == 0
constexpr u32 MUL = 89226354u, ADD = 64248484u;
#else
constexpr u32 MUL = 34038481u, ADD = 76625530u;
#endif

DEVICE u32 shfl(u32 v, int src) {
    u32 r;
    asm volatile("shfl.sync.idx.b32 %0, %1, %2, 0x1f, 0xffffffff;" : "=r"(r) : "r"(v), "r"(src));
    return r;
}

// bits [shift, shift + 32) of hi:lo shifted left by o: the upper word of (hi:lo) << o
DEVICE u32 funnel_left(u32 lo, u32 hi, u32 o) {
    u32 r;
    asm("shf.l.clamp.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(lo), "r"(hi), "r"(o));
    return r;
}

// the state j of a lane whose bit stretch starts at the top of hi:lo: bits [k·j, k·j + 16) from the top
template <int J>
DEVICE u32 state(u32 hi, u32 lo) {
    constexpr int right = 48 - BITS * J;  // the state's lowest bit, counted from the bottom of hi:lo
    if (right == 48) return hi >> 16;
    if (right == 40) return prmt(hi, 0u, 0x4421);  // bytes 1, 2: one instruction instead of two
    if (right >= 32) return (hi >> (right - 32)) & 0xFFFFu;
    return funnel(lo, hi, right) & 0xFFFFu;
}

// the two fp16 parts of a state's value; `magic` is 3INST's 0x3B603B60 held in a register (a LOP3 takes one
// constant operand: given both as constants, the compiler rebuilds one of them for every weight)
DEVICE u32 parts(u32 s, u32 magic) {
    const u32 x = s * MUL + ADD;
#if CODE == 0
    return (x & 0x8FFF8FFFu) ^ magic;
#else
    u32 sum;
    asm("dp4a.u32.u32 %0, %1, %2, %3;" : "=r"(sum) : "r"(x), "r"(0x01010101u), "r"(0u));
    return sum | 0xE5FE6400u;  // (1024 + sum, −1534)
#endif
}

template <int J>
DEVICE void states(u32 hi, u32 lo, u32 magic, u32* v) {
    v[J] = parts(state<J>(hi, lo), magic);
    if constexpr (J + 1 < 8) states<J + 1>(hi, lo, magic, v);
}

// PRESHIFT (0/1, BITS 2 only): the eight states of a lane all lie in hi, at bits 16 − 2j; in hi shifted right by
// 2, 4 or 6 every one of them starts on a byte, so one prmt each takes it out: 3 + 8 operations for the eight
// states instead of 14 (shift and mask for six of them).
#ifndef PRESHIFT
#define PRESHIFT 0
#endif
DEVICE void states_preshifted(u32 hi, u32 magic, u32* v) {
    const u32 h[4] = {hi, hi >> 2, hi >> 4, hi >> 6};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int pos = 16 - 2 * j, s = pos % 8, b = (pos - s) / 8;  // copy hi >> s, bytes b and b + 1
        v[j] = parts(prmt(h[s / 2], 0u, 0x4400u | u32(b + 1) << 4 | u32(b)), magic);
    }
}

struct TrellisPolicy {
    static constexpr int RUN = 4;        // a thread's columns of a tile: 4t … 4t + 3
    static constexpr int STEP = 16 * G;  // G tiles along K
    const u32* codes;
    int K;
    u32 magic;

    struct Step {
        u32 w[MT][LOADS];
    };

    using Cursor = Rows;  // the rows are all a step's loads need
    DEVICE Rows cursor(const Rows& rows, int) const { return rows; }

    DEVICE void load(const Rows& rows, int s, int, Step& d) const {
        const int lane = threadIdx.x & 31;
        const int tile = lane / TW < TPL ? lane / TW : TPL - 1, word = lane % TW;  // spare lanes repeat words
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const long long rb = rows.valid[2 * mt] ? rows.row[2 * mt] >> 4 : 0;
            const u32* p = codes + ((rb * (K / 16) + (long long)s * G + tile) * TW + word);
#pragma unroll
            for (int i = 0; i < LOADS; ++i) load_stream(p + i * TPL * TW, &d.w[mt][i], 1);
        }
    }

    DEVICE void compute(const Rows&, int, int, const Step& d, const Acts& xs, float* acc) const {
        const int lane = threadIdx.x & 31;
        const int first = 8 * BITS * lane;  // the lane's first bit in its tile's stream
        const int a = first >> 5, a1 = a + 1 == TW ? 0 : a + 1;
        const u32 o = first & 31;
        u32 xr[NT][2 * G];  // columns 4t … 4t + 3 of each tile
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int q = 0; q < G; ++q) xs.load(nt, 8 * q, xr[nt] + 2 * q, 2);
#pragma unroll
        for (int q = 0; q < G; ++q) {
            u32 dup[NT][4];  // each column's activation in both halves
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int c = 0; c < 4; ++c) dup[nt][c] = prmt(xr[nt][2 * q + c / 2], 0u, (c & 1) ? 0x3232 : 0x1010);
            const int base = (q % TPL) * TW;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const u32 src = d.w[mt][q / TPL];
                const u32 w0 = shfl(src, base + a), w1 = shfl(src, base + a1);
                u32 v[8];
                if (PRESHIFT && BITS == 2) states_preshifted(funnel_left(w1, w0, o), magic, v);
                else states<0>(funnel_left(w1, w0, o), w1 << o, magic, v);
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    mma_into(acc, 2 * q, mt, nt, v[0], v[4], v[1], v[5], dup[nt][0], dup[nt][1]);
                    mma_into(acc, 2 * q + 1, mt, nt, v[2], v[6], v[3], v[7], dup[nt][2], dup[nt][3]);
                }
            }
        }
    }
};

extern "C" __global__ void GEMV_BOUNDS
harpq_trellis_gemv(const u32* __restrict__ x, int batch, const u32* __restrict__ codes,
                   const u16* __restrict__ scale, int scale_rows, float factor, u16* __restrict__ y,
                   const u16* __restrict__ residual, int M, int K, u32 magic, int split_blocks, int split_q,
                   float* __restrict__ work, u32* __restrict__ counters) {
    const TrellisPolicy p{codes, K, magic};
    // one scale for the matrix, or one per row (matrices of one scale each, stacked)
    gemv_driver(p, x, batch, y, residual, M, K, scale_rows ? factor : factor * half_to_float(scale[0]),
                TailSplit{split_blocks, split_q, work, counters}, scale_rows ? scale : nullptr);
}
