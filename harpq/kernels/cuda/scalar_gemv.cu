// y = x · Ŵᵀ for packed b-bit scalar grids with a scale and a zero-point per group of a row
// (RTN/GPTQ: integer zeros; HQQ: fp16 zeros; QuIP: one scale per matrix, zero (2^b − 1)/2), batch 1–16.
//
// Compile-time configuration (NVRTC -D): BITS (1, 2, 3, 4, 8), INT_ZERO (1: zero-points are integers), TILED,
// NW (32-bit words of a row each thread reads per step: 1, 2, 4; 3 for BITS 3), NORM (the input is RMSNorm(x),
// `gemv_common.cuh`), STEP_SCALE (1: a step lies
// in one group, its scale multiplies the step's fp32 products; 0: groups smaller than a step, the scale
// multiplies each weight pair in fp16), and the driver's MT, NT, WARPS, UNROLL, XEARLY (gemv_common.cuh).
//
// Layout read as stored (harpq's bit stream: 32 codes fill exactly BITS words, lowest bits first), rows one
// after another or, with TILED, row-tiled (`formats.packing.to_row_tiles`: 16 rows at a time, chunks of
// CHUNK words of each row, chunk-major), so that the 16 rows of a warp's step are one contiguous stretch;
// the per-group scales and zeros come as one half2 (scale, zero) per (group, row), tile-major (16 rows at a
// time, group by group), so that a warp's 16 rows of one group are 64 contiguous bytes and a run of steps'
// metadata one stretch. With BULK (TILED layouts whose rows are whole chunks), a warp's steps arrive through
// the TMA (`gemv_common.cuh`); META_GROUPS bounds the groups one slot of SLOT_STEPS steps touches.
//
// Decode, two codes at a time: one lop3 moves codes j and j + P/2 of a word (P codes per word; 16 bits
// apart) into the mantissas of the half2 (1024 + c·2^o, 1024 + c'·2^o) (bit offset o ≤ 9, else from the
// word shifted by 8); one fma by (2^−o, −1024·2^−o − z) gives c − z exactly for integer zeros (for fp16
// zeros: c exactly, then one subtraction of z, rounded once as HQQ's own fp16 dequantization does). The
// tensor cores multiply these small numbers by the activations; the group's scale multiplies the fp32
// result once per step (a step never straddles two groups), not every weight. The activations of a
// pair's two columns are brought together by one prmt per pair and batch tile.

#ifndef TILED
#define TILED 0
#endif
#ifndef FULL_CHUNKS
#define FULL_CHUNKS 0  // 1: a row's words are whole chunks of the tiled layout (the caller checks)
#endif
#define FORMAT_BULK TILED
#ifndef META_GROUPS
#define META_GROUPS (4 * SLOT_STEPS)
#endif
#include "gemv_common.cuh"

constexpr int CHUNK = BITS == 3 ? 12 : 16;  // words of a row per chunk of the tiled layout

#if BITS == 3
constexpr int RUN_ = 32;  // a thread reads 3 words = 32 codes
#else
constexpr int PER = 32 / BITS;  // codes per word
constexpr int RUN_ = NW * PER;
#endif

// -2^(10 - o) and 2^-o as half2
__host__ __device__ constexpr u32 neg_magic(int o) { return (0x8000u | u32(25 - o) << 10) * 0x10001u; }
__host__ __device__ constexpr u32 pow2_neg(int o) { return (u32(15 - o) << 10) * 0x10001u; }

struct RowMeta {
    u32 zero;     // (z, z)
    u32 scale2;   // (s, s)
    u32 nzs;      // −(z·s) in fp16
    float scale;
};

DEVICE RowMeta row_meta(u32 m) {
    const u32 z = prmt(m, m, 0x3232), s = prmt(m, m, 0x1010);
    return {z, s, hmul2(z, s) ^ 0x80008000u, half_to_float(u16(m & 0xFFFFu))};
}

// code pair at mantissa offset o of `src` -> (c − z) pair (fp16x2), times the scale unless STEP_SCALE
DEVICE u32 dequant(u32 src, int o, const RowMeta& m) {
    const u32 v = lop_and_or(src, ((1u << BITS) - 1) * 0x10001u << o, 0x64006400u);
#if INT_ZERO
    const u32 cz = hfma2(v, pow2_neg(o), hsub2(neg_magic(o), m.zero));  // c − z, exact
    return STEP_SCALE ? cz : hmul2(cz, m.scale2);
#else
    const u32 c = hfma2(v, pow2_neg(o), neg_magic(o));  // c, exact
    return STEP_SCALE ? hsub2(c, m.zero) : hfma2(c, m.scale2, m.nzs);  // c − z, or c·s − z·s
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

struct ScalarPolicy {
    static constexpr int RUN = RUN_;
    static constexpr int STEP = 4 * RUN_;
    const u32* codes;
    int row_words;
    const u32* meta;
    int group_shift;
    int groups;  // groups of a row

    struct Step {
        u32 w[2 * MT][NW];
        u32 m[2 * MT];
    };

    // where word w of a row is stored (a thread's NW words never straddle two chunks)
    DEVICE long long word_of(int row, int w) const {
#if TILED
        RETURN_ROW_TILED_AT(row, w, row_words, CHUNK)
#else
        return (long long)row * row_words + w;
#endif
    }

    // the thread's rows, computed once: where each row's words and metadata start, as 32-bit word offsets (one
    // register each; rows past M read row 0, whose results are never stored). Taken at batch ≤ 8 (NT 1); with two
    // n-tiles the addresses are computed at every step from the rows, which measured faster there (H200).
    struct Cursor {
        int code[2 * MT];  // with FULL_CHUNKS, word w of the row lies at codes[code + (w / CHUNK) · 15 · CHUNK + w]
        int meta[2 * MT];  // group gi of the row at meta[meta + 16 · gi]
        int row[2 * MT];
        bool valid[2 * MT];
    };

    DEVICE Cursor cursor(const Rows& rows, int) const {
        Cursor c;
#pragma unroll
        for (int r = 0; r < 2 * MT; ++r) {
            const int row = rows.valid[r] ? rows.row[r] : 0;
            c.row[r] = row;
            c.valid[r] = rows.valid[r];
            c.code[r] = TILED ? (row >> 4) * 16 * row_words + (row & 15) * CHUNK : 0;
            c.meta[r] = (row >> 4) * groups * 16 + (row & 15);
        }
        return c;
    }

    DEVICE void load(const Cursor& c, int s, int t, Step& d) const {
        const int gi = (4 * s + t) >> group_shift;  // runs per group: a power of two (or all of a row)
        const int w = (4 * s + t) * NW;
#pragma unroll
        for (int r = 0; r < 2 * MT; ++r) {
#if NT == 1 && TILED && FULL_CHUNKS  // every chunk CHUNK words wide: only the chunk moves with the step
            load_stream(codes + (unsigned)(c.code[r] + (w / CHUNK) * 15 * CHUNK + w), d.w[r], NW);
#else
            load_stream(codes + word_of(c.row[r], w), d.w[r], NW);
#endif
#if NT == 1
            d.m[r] = meta[(unsigned)(c.meta[r] + gi * 16)];  // rows past M: row 0's, never stored
#else
            d.m[r] = c.valid[r] ? meta[((long long)(c.row[r] >> 4) * groups + gi) * 16 + (c.row[r] & 15)] : 0u;
#endif
        }
    }

#if BULK_ON
    static constexpr int STEP_WORDS = 4 * NW;  // words of a row per step
    static constexpr int SLOT_ALIGN = CHUNK / STEP_WORDS;  // steps per chunk of the tiled layout
    static_assert(SLOT_ALIGN * STEP_WORDS == CHUNK, "a chunk holds whole steps");
    static constexpr int CODE_WORDS = SLOT_STEPS * 16 * STEP_WORDS;
    static constexpr int SLOT_WORDS = CODE_WORDS + META_GROUPS * 16;

    DEVICE u32 fill(int tile_row, int a, int b, u32 slot, u32 bar) const {
        const u32 code_bytes = (b - a) * 16 * STEP_WORDS * 4;  // whole chunks: (b − a) / SLOT_ALIGN of them
        bulk_load(slot, codes + (long long)tile_row * row_words + a * 16 * STEP_WORDS, code_bytes, bar);
        const int g0 = (4 * a) >> group_shift, g1 = (4 * b - 1) >> group_shift;
        const u32 meta_bytes = (g1 - g0 + 1) * 64;
        bulk_load(slot + CODE_WORDS * 4, meta + ((long long)(tile_row >> 4) * groups + g0) * 16, meta_bytes, bar);
        return code_bytes + meta_bytes;
    }

    DEVICE void load_slot(const Rows& rows, const u32* slot, int a, int s, int t, Step& d) const {
        const int gi = ((4 * s + t) >> group_shift) - ((4 * a) >> group_shift);
#pragma unroll
        for (int r = 0; r < 2 * MT; ++r) {
            const u32* at = slot + (r >> 1) * SLOT_WORDS;
            const int local = rows.row[r] & 15;
            const int chunk = (s - a) / SLOT_ALIGN, part = (s - a) % SLOT_ALIGN;
            const u32* w = at + (chunk * 16 + local) * CHUNK + part * STEP_WORDS + t * NW;
            if (NW == 4) {
                const Words4 q = *reinterpret_cast<const Words4*>(w);
#pragma unroll
                for (int i = 0; i < NW; ++i) d.w[r][i] = q.w[i];
            } else if (NW == 2) {
                const Words2 q = *reinterpret_cast<const Words2*>(w);
                d.w[r][0] = q.w[0];
                d.w[r][NW - 1] = q.w[1];
            } else {
#pragma unroll
                for (int i = 0; i < NW; ++i) d.w[r][i] = w[i];
            }
            d.m[r] = at[CODE_WORDS + gi * 16 + local];
        }
    }
#endif

    // this step's products (c − z)·x into `step_acc`, then the rows' scales into `acc`
    DEVICE void compute(const Rows&, int, int, const Step& d, const Acts& xs, float* acc) const {
        RowMeta meta[2 * MT];
#pragma unroll
        for (int r = 0; r < 2 * MT; ++r) meta[r] = row_meta(d.m[r]);
        if (!STEP_SCALE) {  // scaled weight by weight
            products(d, meta, xs, acc);
            return;
        }
        float step_acc[ACC];
#pragma unroll
        for (int i = 0; i < ACC; ++i) step_acc[i] = 0.f;
        products(d, meta, xs, step_acc);
#pragma unroll
        for (int i = 0; i < ACC; ++i) {
            const int mt = (i / (NT * 4)) % MT, c = i & 3;
            acc[i] += meta[2 * mt + (c >= 2 ? 1 : 0)].scale * step_acc[i];
        }
    }

    DEVICE void products(const Step& d, const RowMeta* meta, const Acts& xs, float* acc) const {
#if BITS == 3
        u32 xr[NT][16];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) xs.load(nt, 0, xr[nt], 16);
        u32 win[2 * MT][4], win8[2 * MT][4];
#pragma unroll
        for (int r = 0; r < 2 * MT; ++r) {
            windows3(d.w[r], win[r]);
#pragma unroll
            for (int q = 0; q < 4; ++q) win8[r][q] = win[r][q] >> 8;
        }
#pragma unroll
        for (int kt = 0; kt < 8; ++kt) {
            u32 b[NT][2];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                b[nt][0] = xpair(xr[nt], 2 * kt, 16);
                b[nt][1] = xpair(xr[nt], 2 * kt + 1, 16);
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const int ra = 2 * mt, rb = 2 * mt + 1;
                const u32 a0 = pair3(win[ra], win8[ra], 2 * kt, meta[ra]);
                const u32 a2 = pair3(win[ra], win8[ra], 2 * kt + 1, meta[ra]);
                const u32 a1 = pair3(win[rb], win8[rb], 2 * kt, meta[rb]);
                const u32 a3 = pair3(win[rb], win8[rb], 2 * kt + 1, meta[rb]);
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) mma_into(acc, kt, mt, nt, a0, a1, a2, a3, b[nt][0], b[nt][1]);
            }
        }
#else
        u32 xr[NT][RUN / 2];  // the step's activations, all requested before the first decode
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) xs.load(nt, 0, xr[nt], RUN / 2);
#pragma unroll
        for (int i = 0; i < NW; ++i) {
#pragma unroll
            for (int kt = 0; kt < PER / 4; ++kt) {
                u32 b[NT][2];
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    b[nt][0] = xpair(xr[nt] + i * (PER / 2), 2 * kt, PER / 2);
                    b[nt][1] = xpair(xr[nt] + i * (PER / 2), 2 * kt + 1, PER / 2);
                }
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    const u32 a = d.w[2 * mt][i], b8 = d.w[2 * mt + 1][i];
                    const u32 a0 = pair(a, a >> 8, 2 * kt, meta[2 * mt]);
                    const u32 a2 = pair(a, a >> 8, 2 * kt + 1, meta[2 * mt]);
                    const u32 a1 = pair(b8, b8 >> 8, 2 * kt, meta[2 * mt + 1]);
                    const u32 a3 = pair(b8, b8 >> 8, 2 * kt + 1, meta[2 * mt + 1]);
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt)
                        mma_into(acc, i * (PER / 4) + kt, mt, nt, a0, a1, a2, a3, b[nt][0], b[nt][1]);
                }
            }
        }
#endif
    }
};

extern "C" __global__ void GEMV_BOUNDS
harpq_scalar_gemv(const u32* __restrict__ x, int batch, const u32* __restrict__ codes, int row_words,
                  const u32* __restrict__ meta, int group_shift, int groups, u16* __restrict__ y,
                  const u16* __restrict__ residual, int M, int K, const u32* __restrict__ norm_w, float norm_eps,
                  int split_blocks, int split_q, float* __restrict__ work, u32* __restrict__ counters) {
    const ScalarPolicy p{codes, row_words, meta, group_shift, groups};
    gemv_driver(p, x, batch, y, residual, M, K, 1.0f, TailSplit{split_blocks, split_q, work, counters}, nullptr, norm_w,
                norm_eps);
}
