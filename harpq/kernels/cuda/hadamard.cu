// y = Q x or Qᵀ x for the randomized Hadamard side Q = H_n · diag(s) / √n with Sylvester H_n, n a power of
// two (256 ≤ n ≤ 8192), for decode rows: one block per row, the whole transform in one launch.
//
// The online transforms of QuIP#'s RHT run as a product of block stages elsewhere (two launches per side
// and a float32 round trip through memory between them); at decode sizes those launches and round trips
// cost more than the arithmetic. Here a block holds its row in shared memory and applies the butterflies
// of three index bits at a time in registers (eight values per thread): ⌈log2(n) / 3⌉ passes with a
// barrier between them, the signs and 1/√n fused into the first and last. Forward: H (s ⊙ x) / √n;
// transposed: s ⊙ (H x) / √n (H is symmetric).
//
// No CUDA headers: compiles with NVRTC alone.

typedef unsigned short u16;

#define NMAX 8192
#define NPAD (NMAX + NMAX / 8)

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// index of value e (0 ≤ e < 2^w) of group g, whose w bits sit at bit b of the index
__device__ __forceinline__ int element(int g, int e, int b, int w) {
    const int low = g & ((1 << b) - 1), high = g >> b;
    return (high << (b + w)) | (e << b) | low;
}

// where index i lives in shared memory: one word of padding per 8 keeps the strided passes (eight
// consecutive values per thread; eight-apart values) free of bank conflicts
__device__ __forceinline__ int padded(int i) { return i + (i >> 3); }

extern "C" __global__ void __launch_bounds__(NMAX / 8)
harpq_hadamard(const u16* __restrict__ x, const float* __restrict__ signs, u16* __restrict__ y, int n,
               int log_n, int transpose) {
    __shared__ float buf[NPAD];
    const int t = threadIdx.x, row = blockIdx.x;  // blockDim.x = min(n / 8, 1024)
    const u16* xr = x + (long long)row * n;
    u16* yr = y + (long long)row * n;
    const float scale = rsqrtf((float)n);
    for (int b = 0; b < log_n; b += 3) {
        const int w = log_n - b < 3 ? log_n - b : 3, m = 1 << w;
        const bool first = b == 0, last = b + w == log_n;
        // each index belongs to one group of this pass, read and written by one thread: in place
        for (int g = t; g < (n >> w); g += blockDim.x) {
            float v[8];
            if (first && w == 3) {  // eight consecutive values: one 16-byte load (and two of signs)
                uint4 q = *reinterpret_cast<const uint4*>(xr + 8 * g);
                const u16* h = reinterpret_cast<const u16*>(&q);
#pragma unroll
                for (int e = 0; e < 8; ++e) v[e] = h2f(h[e]);
                if (!transpose) {
                    const float4 s0 = *reinterpret_cast<const float4*>(signs + 8 * g);
                    const float4 s1 = *reinterpret_cast<const float4*>(signs + 8 * g + 4);
                    v[0] *= s0.x; v[1] *= s0.y; v[2] *= s0.z; v[3] *= s0.w;
                    v[4] *= s1.x; v[5] *= s1.y; v[6] *= s1.z; v[7] *= s1.w;
                }
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    if (e < m) {
                        const int i = element(g, e, b, w);
                        v[e] = first ? h2f(xr[i]) * (transpose ? 1.f : signs[i]) : buf[padded(i)];
                    }
                }
            }
#pragma unroll
            for (int h = 1; h < 8; h <<= 1) {  // Sylvester butterflies over the group's bits
                if (h < m) {
#pragma unroll
                    for (int e = 0; e < 8; ++e) {
                        if (e < m && !(e & h)) {
                            const float a = v[e], c = v[e | h];
                            v[e] = a + c;
                            v[e | h] = a - c;
                        }
                    }
                }
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                if (e < m) {
                    const int i = element(g, e, b, w);
                    if (last) yr[i] = f2h(v[e] * scale * (transpose ? signs[i] : 1.f));
                    else buf[padded(i)] = v[e];
                }
            }
        }
        if (!last) __syncthreads();
    }
}
