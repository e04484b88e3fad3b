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

// a float another block wrote (fenced before it said so), from L2, past this SM's L1 (CUDA's __ldcg, which
// costs NVRTC five times the compile time of a kernel)
DEVICE float load_l2(const float* p) {
    float r;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(r) : "l"(p));
    return r;
}

DEVICE u32 shared_address(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// Weights are read once: keep them out of L1. Activations and tables are re-read by every warp: cached.
DEVICE void load_stream(const u32* p, u32* r, int n) {
    if (n == 4) {
        asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "l"(p));
    } else if (n == 2) {
        asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "l"(p));
    } else {
        for (int i = 0; i < n; ++i)
            asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(r[i]) : "l"(p + i));
    }
}

// n words (a multiple of 2) from p where `on` (a batch row that exists). Lanes of absent batch rows leave
// their registers undefined: those products land in output columns that are never stored, so they need
// no zeroing, and skipping their loads keeps L1 traffic at what the batch needs (a warp-wide 16-byte load
// moves 512 bytes through L1 even when all lanes share 4 addresses). With XEARLY the loads are volatile
// with a memory clobber, so that a step's activation loads go out together before its decode (more
// registers); without, the compiler places each before its first use.
#if XEARLY
#define X_ASM asm volatile
#define X_CLOBBER : "memory"
#else
#define X_ASM asm
#define X_CLOBBER
#endif
DEVICE void load_cached(const u32* p, u32* r, int n, bool on) {
    const u32 pred = on;
    int i = 0;
    for (; i + 4 <= n; i += 4)
        X_ASM("{ .reg .pred q; setp.ne.u32 q, %5, 0; @q ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4]; }"
              : "=r"(r[i]), "=r"(r[i + 1]), "=r"(r[i + 2]), "=r"(r[i + 3]) : "l"(p + i), "r"(pred) X_CLOBBER);
    for (; i + 2 <= n; i += 2)
        X_ASM("{ .reg .pred q; setp.ne.u32 q, %3, 0; @q ld.global.nc.v2.u32 {%0, %1}, [%2]; }"
              : "=r"(r[i]), "=r"(r[i + 1]) : "l"(p + i), "r"(pred) X_CLOBBER);
}

// The body of a format's "where is element e of a row of row_len elements" in the row-tiled layout of
// `formats.packing.to_row_tiles` (16 rows at a time, chunks of `chunk` elements of each row in turn, the last
// chunk shorter where the row is); the elements a thread reads at once lie in one chunk. A macro rather than a
// function: as one the compiler allocated a tested kernel's registers differently (128 -> 150).
#define RETURN_ROW_TILED_AT(row, e, row_len, chunk)                                                         \
    const int c = (e) / (chunk), width = min((chunk), (row_len) - c * (chunk));                             \
    return (long long)((row) >> 4) * 16 * (row_len) + c * 16 * (chunk) + ((row) & 15) * width + (e) - c * (chunk);

// Programmatic dependent launch (sm_90 on): launched with programmatic stream serialization, a GEMV
// starts while the kernel before it finishes and streams its first weights (which no kernel writes) in
// that time; it waits for the producer's results (its activations, the residual) before it reads them,
// and lets the kernel after it start once its own loads are done. Without that launch attribute both
// instructions do nothing. The waited-for pointer comes out of the wait, so no load through it can be
// placed before it.
template <class T>
DEVICE const T* after_producer(const T* p) {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" : "+l"(p) : : "memory");
#endif
    return p;
}

DEVICE void let_dependents_start() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" : : : "memory");
#endif
}

// BULK (0/1; sm_90 on, else ignored): a warp's weights come through the Tensor Memory Accelerator instead of
// register loads. Each warp takes one contiguous run of K-steps; its lane 0 copies SLOT_STEPS steps at a time
// (the stored bytes of a row-tiled layout: one stretch of codes and one of metadata per m-tile) into a ring of
// SLOTS slots in shared memory, each slot with an mbarrier that completes when its bytes have landed. So up to
// SLOTS · SLOT_STEPS steps are in flight per warp at the cost of shared memory, not registers, and one
// instruction moves a kilobyte or more. The warp reads a landed slot into the format's Step and re-fills it
// once the step's products are done.
#ifndef BULK
#define BULK 0
#endif
// A format that can (its policy has SLOT_WORDS, fill and load_slot) defines FORMAT_BULK before including this.
#ifndef FORMAT_BULK
#define FORMAT_BULK 0
#endif
#if BULK && FORMAT_BULK && __CUDA_ARCH__ >= 900
#define BULK_ON 1
#else
#define BULK_ON 0
#endif
#ifndef SLOTS
#define SLOTS 4
#endif
#ifndef SLOT_STEPS
#define SLOT_STEPS 2
#endif
#ifndef XPREFETCH
#define XPREFETCH 1  // with BULK: the warp's activations prefetched into L1 while its weights are in flight
#endif

#if BULK_ON
DEVICE void barrier_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" : : "r"(bar), "r"(count) : "memory");
}

// the barrier's one arrival, with the bytes its phase waits for
DEVICE void barrier_expect(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" : : "r"(bar), "r"(bytes) : "memory");
}

DEVICE void barrier_wait(u32 bar, u32 parity) {
    asm volatile(
        "{ .reg .pred done; WAIT: mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1; @!done bra WAIT; }"
        : : "r"(bar), "r"(parity) : "memory");
}

// bytes (a multiple of 16, both addresses 16-byte aligned) from global src to shared dst, counted on bar
DEVICE void bulk_load(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 : : "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}

DEVICE void fence_barrier_init() { asm volatile("fence.mbarrier_init.release.cluster;" : : : "memory"); }

// the warp's reads of a slot (generic proxy) before the copy that re-fills it (async proxy)
DEVICE void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;" : : : "memory"); }
#endif

// c += A · B for one 16×16 weight tile (a0..a3, rows g/g+8) and one 16×8 activation tile (b0, b1)
DEVICE void mma16816(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// ---------------------------------------------------------------------------------------------------
// The driver shared by every format. Compile-time: MT (m-tiles of 16 rows per warp: 1 or 2), NT (n-tiles
// of 8 batch rows: 1 or 2), WARPS (warps of a block, splitting K into steps), UNROLL (steps whose loads
// go out together), XEARLY (see load_cached). A block owns 16·MT rows; warp w takes steps w, w + WARPS,
// ...; the loads of the next UNROLL steps are issued before the current ones are decoded (software
// pipelining), and with one m-tile
// the k-tiles alternate between two accumulator sets, so the tensor-core chain is never one long
// dependency. The format policy P supplies:
//   P::RUN, P::STEP          columns a thread / a warp covers per step (STEP = 4·RUN)
//   P::Step                  what one step's loads bring for the thread's 2·MT rows
//   P::Cursor, p.cursor(rows, t)   what the thread's loads need that no step changes (its rows' addresses)
//   p.load(cursor, s, t, step) issue those loads
//   p.compute(rows, s, t, step, xs, acc)   decode + mma; xs (Acts): the thread's activations of step s
// and, for BULK:
//   P::SLOT_WORDS            shared-memory words of one slot (SLOT_STEPS steps) for one m-tile
//   P::SLOT_ALIGN            steps whose bytes are one stretch (a slot starts at a multiple of it)
//   p.fill(tile_row, a, b, slot, bar)       lane 0: copy steps [a, b) of the 16-row tile at tile_row into the
//                                           slot (a shared address), counted on bar; returns the bytes
//   p.load_slot(rows, slot, a, s, t, step)  the thread's Step of step s from a landed slot whose first step is a
//
// NORM (0/1): the GEMV's input is RMSNorm(x) with weight g (the layer's input norm folded into the GEMV, one
// launch less; batch ≤ NORM_ROWS): each block normalizes x into shared memory while its first weight loads
// are in flight (`normalize_into`), and its steps read the activations from there.

// MIN_BLOCKS: blocks per SM the register allocation must leave room for, so that a grid just over what
// fits fills the GPU in one wave (a second launch-bounds argument of 1 is not the same as none: it
// changes the allocation, so it is only given where asked for)
#if defined(MIN_BLOCKS) && MIN_BLOCKS > 1
#define GEMV_BOUNDS __launch_bounds__(WARPS * 32, MIN_BLOCKS)
#else
#define GEMV_BOUNDS __launch_bounds__(WARPS * 32)
#endif

constexpr int ACC_SETS = MT == 1 ? 2 : 1;
constexpr int ACC = ACC_SETS * MT * NT * 4;

#ifndef NORM
#define NORM 0
#endif
// GLU (0/1): the matrix is [gate; up] stacked (M = 2F rows, F a multiple of 16) and the GEMV stores
// silu(gate) · up (B × F), the SiLU·up of a Llama MLP in its epilogue instead of a launch of its own: block b
// holds gate rows 16b … 16b + 15 as its m-tile 0 and the same up rows (F below) as its m-tile 1 (MT = 2).
#ifndef GLU
#define GLU 0
#endif

struct Rows {
    int row[2 * MT];      // rows g, g+8 of each m-tile
    bool valid[2 * MT];
};

DEVICE u32 half2_of(float f) {
    const u32 h = float_to_half(f);
    return h | h << 16;
}

struct alignas(16) Words4 {
    u32 w[4];
};

struct alignas(8) Words2 {
    u32 w[2];
};

// The activations of one step as a thread reads them: words `off` … `off + n` of its run in n-tile nt
// (batch row g + 8·nt), absent rows skipped (see load_cached); with NORM, from the block's normalized copy in
// shared memory.
struct Acts {
    const u32* row[NT];
    bool on[NT];
    DEVICE void load(int nt, int off, u32* v, int n) const {
#if NORM
        if (on[nt] && n % 4 == 0)
#pragma unroll
            for (int i = 0; i < n; i += 4) {
                const Words4 q = *reinterpret_cast<const Words4*>(row[nt] + off + i);
#pragma unroll
                for (int j = 0; j < 4; ++j) v[i + j] = q.w[j];
            }
        else if (on[nt])
#pragma unroll
            for (int i = 0; i < n; ++i) v[i] = row[nt][off + i];
#else
        load_cached(row[nt] + off, v, n, on[nt]);
#endif
    }
};

// With NORM (batch ≤ NORM_ROWS, (batch + 1) · K halves of shared memory): the block's copy of RMSNorm(x) for
// every batch row, fp16(x · r) · g with r = 1/rms as Llama's norm rounds it, made once before the main loop
// while the first weight loads are in flight. x and g go out together in 16-byte chunks (one L2 round trip
// where K ≤ 32 · threads), each row's sum of squares is summed over the block, then every thread scales the
// chunks it stored itself.
constexpr int NORM_ROWS = 2;

DEVICE void normalize_into(const u32* x, const u32* gw, int batch, int K, float eps, u32* xn) {
    __shared__ float part[WARPS][NORM_ROWS];
    __shared__ float rinv[NORM_ROWS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, threads = WARPS * 32;
    const int chunks = K / 8;  // 16-byte chunks of a row
    u32* gs = xn + batch * (K / 2);  // g's copy, after the rows
    float ss[NORM_ROWS];
#pragma unroll
    for (int b = 0; b < NORM_ROWS; ++b) ss[b] = 0.f;
    for (int c0 = threadIdx.x; c0 < chunks; c0 += 4 * threads) {
        u32 v[NORM_ROWS + 1][4][4];  // rows, then g
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const bool in = c0 + u * threads < chunks;
            load_cached(gw + 4 * (c0 + u * threads), v[NORM_ROWS][u], 4, in);
#pragma unroll
            for (int b = 0; b < NORM_ROWS; ++b)
                load_cached(x + (long long)b * (K / 2) + 4 * (c0 + u * threads), v[b][u], 4, in && b < batch);
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            if (c0 + u * threads >= chunks) continue;
            const int at = 4 * (c0 + u * threads);
            *reinterpret_cast<Words4*>(gs + at) = Words4{{v[NORM_ROWS][u][0], v[NORM_ROWS][u][1], v[NORM_ROWS][u][2],
                                                          v[NORM_ROWS][u][3]}};
#pragma unroll
            for (int b = 0; b < NORM_ROWS; ++b) {
                if (b >= batch) continue;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const float lo = half_to_float(u16(v[b][u][j] & 0xFFFFu)), hi = half_to_float(u16(v[b][u][j] >> 16));
                    ss[b] = fmaf(lo, lo, fmaf(hi, hi, ss[b]));
                }
                *reinterpret_cast<Words4*>(xn + b * (K / 2) + at) = Words4{{v[b][u][0], v[b][u][1], v[b][u][2], v[b][u][3]}};
            }
        }
    }
#pragma unroll
    for (int b = 0; b < NORM_ROWS; ++b) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) ss[b] += __shfl_xor_sync(0xffffffffu, ss[b], o);
        if (lane == 0) part[warp][b] = ss[b];
    }
    __syncthreads();
    if (threadIdx.x < batch) {
        float sum = 0.f;
        for (int w = 0; w < WARPS; ++w) sum += part[w][threadIdx.x];
        rinv[threadIdx.x] = rsqrtf(sum / K + eps);
    }
    __syncthreads();
    for (int c = threadIdx.x; c < chunks; c += threads) {
        const Words4 gq = *reinterpret_cast<const Words4*>(gs + 4 * c);
        for (int b = 0; b < batch; ++b) {
            const u32 r = half2_of(rinv[b]);
            Words4* at = reinterpret_cast<Words4*>(xn + b * (K / 2) + 4 * c);
            Words4 q = *at;
#pragma unroll
            for (int j = 0; j < 4; ++j) q.w[j] = hmul2(hmul2(q.w[j], r), gq.w[j]);
            *at = q;
        }
    }
    __syncthreads();
}

// The tail split. A grid of B row blocks on S SMs leaves B mod S blocks over after whole rounds, and the SMs that
// take one of them carry a whole block more than the rest: at 11008 rows (688 16-row blocks on 132 SMs) 6 blocks
// where the mean is 5.2. Split along K, those last blocks become q blocks each (launched last, so that they land on
// the SMs with the fewest), each summing the products of its 1/q of the steps. Each part leaves its sums (fp32, after
// the block's own reduction) in its own slot of `work`; the part that counts itself last in `counters` adds the
// slots in part order (so the result does not depend on which part finished when), stores the outputs as an unsplit
// block would, and sets its counter back to zero. The counters are zero between launches; GEMVs that share the
// buffers must not run concurrently (one stream: they do not).
struct TailSplit {
    int blocks;      // the last row blocks, split (0: none)
    int q;           // parts per split block
    float* work;     // q · 32 · MT · NT · 4 floats per split block
    u32* counters;   // one per split block
};

// acc += A·B into the accumulator of k-tile kt, m-tile mt, n-tile nt
DEVICE void mma_into(float* acc, int kt, int mt, int nt, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    const int set = ACC_SETS == 2 ? (kt & 1) : 0;
    mma16816(acc + ((set * MT + mt) * NT + nt) * 4, a0, a1, a2, a3, b0, b1);
}

// y = scale · acc, times row_scale[row] where given (matrices of one scale each, stacked), + residual
// where given (the residual add of a decoder layer, fused)
template <class P>
DEVICE void gemv_driver(const P& p, const u32* __restrict__ x, int batch, u16* __restrict__ y,
                        const u16* __restrict__ residual, int M, int K, float scale, const TailSplit& split,
                        const u16* __restrict__ row_scale = nullptr, const u32* __restrict__ norm_w = nullptr,
                        float norm_eps = 0.f) {
    constexpr int RED = WARPS * MT * NT * 4 * 32;  // the block's reduction: one float per accumulator and thread
#if BULK_ON
    // the ring, and after the main loop the reduction in the same bytes
    constexpr int RING = WARPS * SLOTS * MT * P::SLOT_WORDS;
    __shared__ __align__(128) u32 ring_words[RING > RED ? RING : RED];
    float* red = reinterpret_cast<float*>(ring_words);
    auto ring = reinterpret_cast<u32(*)[SLOTS][MT * P::SLOT_WORDS]>(ring_words);
#else
    __shared__ float red[RED];
#endif
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    // this block's row block, and its steps: all of them, or one part's share (the tail split; not with BULK)
    const int nsteps = K / P::STEP;
    const int whole = gridDim.x - split.blocks * split.q;
    const bool is_part = (int)blockIdx.x >= whole;
    const int blk = is_part ? whole + (blockIdx.x - whole) / split.q : blockIdx.x;
    const int part = is_part ? (blockIdx.x - whole) % split.q : 0;
    const int s_begin = is_part ? part * nsteps / split.q : 0;
    const int s_end = is_part ? (part + 1) * nsteps / split.q : nsteps;
#if GLU
    static_assert(MT == 2, "GLU pairs a gate tile with its up tile");
    const int row0 = blk * 16, tile_step = M / 2;  // m-tile 1 lies M/2 rows below m-tile 0
#else
    const int row0 = blk * 16 * MT, tile_step = 16;
#endif
    Rows rows;
#pragma unroll
    for (int r = 0; r < 2 * MT; ++r) {
        rows.row[r] = row0 + tile_step * (r >> 1) + g + 8 * (r & 1);
        rows.valid[r] = row0 + g + 8 * (r & 1) < (GLU ? M / 2 : M) && rows.row[r] < M;
    }
    float acc[ACC];
#pragma unroll
    for (int i = 0; i < ACC; ++i) acc[i] = 0.f;

#if BULK_ON
    if (split.blocks) __trap();  // the ring runs whole row blocks only (the backend never asks otherwise)
    // a contiguous run of steps per warp, SLOT_STEPS per slot of the warp's ring
    __shared__ __align__(8) unsigned long long bars[WARPS][SLOTS];
    static_assert(SLOT_STEPS % P::SLOT_ALIGN == 0, "a slot holds whole runs of SLOT_ALIGN steps");
    const int runs = nsteps / P::SLOT_ALIGN;
    const int a0 = warp * runs / WARPS * P::SLOT_ALIGN, a1 = (warp + 1) * runs / WARPS * P::SLOT_ALIGN;
    const int nslots = (a1 - a0 + SLOT_STEPS - 1) / SLOT_STEPS;
    auto fill = [&](int j) {  // lane 0: copy slot j's steps
        const int a = a0 + j * SLOT_STEPS, b = min(a + SLOT_STEPS, a1);
        u32* slot = ring[warp][j % SLOTS];
        const u32 bar = shared_address(&bars[warp][j % SLOTS]);
        u32 bytes = 0;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
            if (rows.valid[2 * mt]) bytes += p.fill(rows.row[2 * mt] - g, a, b, shared_address(slot + mt * P::SLOT_WORDS), bar);
        barrier_expect(bar, bytes);
    };
    if (lane == 0) {
        for (int i = 0; i < SLOTS; ++i) barrier_init(shared_address(&bars[warp][i]), 1);
        fence_barrier_init();
        for (int j = 0; j < min(SLOTS, nslots); ++j) fill(j);
    }
    __syncwarp();
#else
    const typename P::Cursor at = p.cursor(rows, t);
    typename P::Step cur[UNROLL], nxt[UNROLL];
    const int s_first = s_begin + warp;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
        if (s_first + u * WARPS < s_end) p.load(at, s_first + u * WARPS, t, cur[u]);
#endif

    x = after_producer(x);  // the weights above needed nothing from the kernel before; x does
    asm("" : "+l"(residual) : "l"(x));  // so does the residual: its pointer now comes after the wait
    const u32* xrow[NT];
    bool xon[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        xon[nt] = g + 8 * nt < batch;
        xrow[nt] = x + (long long)(xon[nt] ? g + 8 * nt : 0) * (K / 2) + t * (P::RUN / 2);
    }
#if NORM
#if !BULK_ON
    // the loads of the steps after the first go out too, so the weights stream while the block normalizes x
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
        if (s_first + (UNROLL + u) * WARPS < s_end) p.load(at, s_first + (UNROLL + u) * WARPS, t, nxt[u]);
#endif
    extern __shared__ __align__(16) u32 xn[];  // (batch + 1) × K halves, dynamic
    normalize_into(x, norm_w, batch, K, norm_eps, xn);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) xrow[nt] = xn + (xon[nt] ? g + 8 * nt : 0) * (K / 2) + t * (P::RUN / 2);
#endif
    auto step_acts = [&](int s) {
        Acts xs;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            xs.row[nt] = xrow[nt] + s * (P::STEP / 2);
            xs.on[nt] = xon[nt];
        }
        return xs;
    };
#if BULK_ON
#if !NORM && XPREFETCH
    // the warp's activations (its run of columns, every batch row) into L1 while its weights are in flight
    {
        const int lines = ((a1 - a0) * P::STEP * 2 + 127) / 128;
        for (int i = lane; i < batch * lines; i += 32)
            asm volatile("prefetch.global.L1 [%0];"
                         : : "l"(reinterpret_cast<const char*>(x) + ((long long)(i / lines) * K + a0 * P::STEP) * 2 +
                                 (i % lines) * 128));
    }
#endif
    for (int j = 0; j < nslots; ++j) {
        const u32* slot = ring[warp][j % SLOTS];
        barrier_wait(shared_address(&bars[warp][j % SLOTS]), (j / SLOTS) & 1);
        const int a = a0 + j * SLOT_STEPS;
#pragma unroll
        for (int u = 0; u < SLOT_STEPS; ++u) {
            if (a + u < a1) {
                typename P::Step d;
                p.load_slot(rows, slot, a, a + u, t, d);
                p.compute(rows, a + u, t, d, step_acts(a + u), acc);
            }
        }
        __syncwarp();
        if (lane == 0 && j + SLOTS < nslots) {
            fence_async_shared();
            fill(j + SLOTS);
        }
    }
#else
    for (int s0 = s_first; s0 < s_end; s0 += WARPS * UNROLL) {
        const int s1 = s0 + WARPS * UNROLL;
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
            if (s1 + u * WARPS < s_end && !(NORM && s0 == s_first)) p.load(at, s1 + u * WARPS, t, nxt[u]);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int s = s0 + u * WARPS;
            if (s < s_end) p.compute(rows, s, t, cur[u], step_acts(s), acc);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) cur[u] = nxt[u];
    }
#endif

    let_dependents_start();

    // sum the accumulator sets, then the warps of the block
#if BULK_ON
    __syncthreads();  // every warp is done with its ring before the reduction overwrites it
#endif
    constexpr int V = MT * NT * 4;
#pragma unroll
    for (int v = 0; v < V; ++v) {
        float a = acc[v];
        if (ACC_SETS == 2) a += acc[V + v];
        red[(warp * V + v) * 32 + lane] = a;
    }
    __syncthreads();
    if (warp != 0) return;
    float sums[V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
        sums[v] = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) sums[v] += red[(w * V + v) * 32 + lane];
    }
    if (is_part) {  // leave this part's sums; the last part to finish adds them all, in part order, and stores
        float* slots = split.work + (long long)(blk - whole) * split.q * 32 * V;
#pragma unroll
        for (int v = 0; v < V; ++v) slots[(part * 32 + lane) * V + v] = sums[v];
        __threadfence();
        __syncwarp();
        u32 done = 0;
        if (lane == 0) done = atomicAdd(split.counters + (blk - whole), 1u);
        if (__shfl_sync(0xffffffffu, done, 0) != (u32)split.q - 1) return;
        __threadfence();
        float total[V];
#pragma unroll
        for (int v = 0; v < V; ++v) total[v] = 0.f;
        for (int q = 0; q < split.q; ++q)
#pragma unroll
            for (int v = 0; v < V; ++v) total[v] += q == part ? sums[v] : load_l2(slots + (q * 32 + lane) * V + v);
#pragma unroll
        for (int v = 0; v < V; ++v) sums[v] = total[v];
        if (lane == 0) split.counters[blk - whole] = 0;
    }
#if GLU
    // y (B × M/2) = silu(gate) · up, gate from m-tile 0, up from m-tile 1 (the same output rows)
    const int F = M / 2;
#pragma unroll
    for (int v = 0; v < V / 2; ++v) {
        float gate = sums[v], up = sums[V / 2 + v];
        const int nt = (v / 4) % NT, c = v & 3;
        const int row = row0 + g + (c >= 2 ? 8 : 0);
        const int n = 8 * nt + 2 * t + (c & 1);
        if (row < F && n < batch) {
            gate *= scale * (row_scale ? half_to_float(row_scale[row]) : 1.f);
            up *= scale * (row_scale ? half_to_float(row_scale[F + row]) : 1.f);
            y[(long long)n * F + row] = float_to_half(gate / (1.f + __expf(-gate)) * up);
        }
    }
#else
#pragma unroll
    for (int v = 0; v < V; ++v) {
        float sum = sums[v];
        const int mt = v / (NT * 4), nt = (v / 4) % NT, c = v & 3;
        const int row = row0 + 16 * mt + g + (c >= 2 ? 8 : 0);
        const int n = 8 * nt + 2 * t + (c & 1);
        if (row < M && n < batch) {
            const long long at = (long long)n * M + row;
            if (row_scale) sum *= half_to_float(row_scale[row]);
            y[at] = float_to_half(residual ? sum * scale + half_to_float(residual[at]) : sum * scale);
        }
    }
#endif
}
