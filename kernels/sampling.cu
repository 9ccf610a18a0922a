// Token selection over logits [rows, vocab] (f32, f16 or bf16). One 1024-thread block per row.
//
// argmax: first maximum wins (NaN never wins; an all-NaN row gives 0).
// sample: the contract documented on `SampleParams` (crates/backend/src/backend.rs), including
// its floating-point summation order, so a row draws the same token as the CPU reference:
//   1. temperature <= 0 (or NaN), 1 / temperature not finite, or top_k == 1: argmax.
//   2. candidates: non-NaN ids sorted by (logit desc, id asc) — a bitonic sort of 64-bit
//      (inverted order key << 32 | id) composites in the row's slot of the stream workspace —
//      cut to the first top_k when 0 < top_k < candidates.
//   3. w = expf((logit - max) * (1 / temperature)) (the CPU backend's expression).
//   4. top_p < 1: keep the shortest sorted prefix whose sequential weight sum reaches
//      top_p * (sequential sum over the candidates).
//   5. u = sample_uniform(seed, step); walking kept ids in ascending order, the first whose
//      running sum exceeds u * (sum of kept weights in that order); else the last kept id.
// Sums are taken strictly left to right (warp 0 computes 32 weights at once, then adds them in
// order), which is what makes the result bit-identical to a sequential CPU loop.
#include "common.cuh"

// Rows per launch: the per-row parameters travel by value in the launch (64 × 32 bytes).
#define SAMPLE_ROWS_MAX 64

struct SampleRow {
    float temperature;
    u32 top_k;
    float top_p;
    u32 pad;
    u64 seed;
    u64 step;
};
struct SampleBatch {
    SampleRow rows[SAMPLE_ROWS_MAX];
};

__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// `sample_uniform` of crates/backend/src/backend.rs: u in [0, 1) with 24 random bits.
__device__ __forceinline__ float sample_uniform(u64 seed, u64 step) {
    const u64 gamma = 0x9E3779B97F4A7C15ull;
    const u64 r = mix64((seed + gamma) ^ mix64(step + gamma));
    return (float)(r >> 40) * (1.0f / 16777216.0f);
}

// Order-preserving map of a float to u32 (larger float -> larger key). NaN maps to 0.
__device__ __forceinline__ u32 fkey(float z) {
    if (z != z) return 0u;
    const u32 u = __float_as_uint(z);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct ArgBest {
    float v;
    int i;
};
__device__ __forceinline__ ArgBest better(ArgBest a, ArgBest b) {
    if (b.v > a.v || (b.v == a.v && b.i < a.i)) return b;
    return a;
}

// Block argmax of x[0..n); every thread gets the result. `sv`/`si` hold 32 entries each.
template <typename T>
__device__ int block_argmax(const T* __restrict__ x, int n, float* sv, int* si) {
    ArgBest best = {NEG_INF, 0x7fffffff};
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float v = to_f32(x[j]);
        if (v > best.v || (v == best.v && j < best.i)) best = {v, j};
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        ArgBest other = {__shfl_xor_sync(0xffffffffu, best.v, o), __shfl_xor_sync(0xffffffffu, best.i, o)};
        best = better(best, other);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) {
        sv[warp] = best.v;
        si[warp] = best.i;
    }
    __syncthreads();
    best = lane < warps ? ArgBest{sv[lane], si[lane]} : ArgBest{NEG_INF, 0x7fffffff};
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        ArgBest other = {__shfl_xor_sync(0xffffffffu, best.v, o), __shfl_xor_sync(0xffffffffu, best.i, o)};
        best = better(best, other);
    }
    return best.i == 0x7fffffff ? 0 : best.i;
}

template <typename T>
__device__ void argmax_impl(const T* logits, int* out, int vocab) {
    SHARED_ARRAY(float, sv, 32);
    SHARED_ARRAY(int, si, 32);
    const int best = block_argmax(logits + (i64)blockIdx.x * vocab, vocab, sv, si);
    if (threadIdx.x == 0) out[blockIdx.x] = best;
}

__device__ __forceinline__ u64 composite(float v, int id) {
    if (v != v) return ~0ull;  // NaN: after every candidate
    return ((u64)(~fkey(v)) << 32) | (u32)id;
}

// Kept ids gathered into shared memory (sorted by id) when there are at most this many.
#define SAMPLE_SMALL_KEPT 1024

// Sequential sum, by warp 0, of f(i) for i in [0, n) in index order: every lane returns it.
// Lanes compute 32 terms at once; the adds happen strictly in index order.
template <typename F>
__device__ float warp_seq_sum(int n, F f) {
    const int lane = threadIdx.x & 31;
    float acc = 0.0f;
    for (int base = 0; base < n; base += 32) {
        const float w = base + lane < n ? f(base + lane) : 0.0f;
#pragma unroll
        for (int k = 0; k < 32; ++k) acc += __shfl_sync(0xffffffffu, w, k);
    }
    return acc;
}

// First i in [0, n) (index order) at which the running sum of f exceeds target (`ge`: reaches
// it); -1 if none. Warp 0 only; every lane returns it.
template <typename F>
__device__ int warp_seq_find(int n, float target, bool ge, F f) {
    const int lane = threadIdx.x & 31;
    float acc = 0.0f;
    for (int base = 0; base < n; base += 32) {
        const float w = base + lane < n ? f(base + lane) : 0.0f;
        for (int k = 0; k < 32 && base + k < n; ++k) {
            acc += __shfl_sync(0xffffffffu, w, k);
            if (ge ? acc >= target : acc > target) return base + k;
        }
    }
    return -1;
}

// `ws` is this launch's workspace: `rows` slots of `vpow2` u64 composites (vpow2 = vocab
// rounded up to a power of two).
template <typename T>
__device__ void sample_impl(const T* logits, int* out, int vocab, int row0, const SampleBatch& batch, u64* ws,
                            int vpow2) {
    SHARED_ARRAY(float, sv, 32);
    SHARED_ARRAY(int, si, 32);
    SHARED_ARRAY(u32, su, 32);
    SHARED_ARRAY(int, kept_ids, SAMPLE_SMALL_KEPT);
    SHARED(int, keep_sh);
    const SampleRow p = batch.rows[blockIdx.x];
    const i64 row = (i64)row0 + blockIdx.x;
    const T* x = logits + row * vocab;
    const int top = block_argmax(x, vocab, sv, si);
    // Tiny temperatures whose inverse overflows are greedy too (the CPU reference's rule).
    if (!(p.temperature > 0.0f) || isinf(1.0f / p.temperature) || p.top_k == 1u) {
        if (threadIdx.x == 0) out[row] = top;
        return;
    }
    u64* comp = ws + (i64)blockIdx.x * vpow2;
    u32 valid = 0;
    for (int j = threadIdx.x; j < vpow2; j += blockDim.x) {
        const u64 c = j < vocab ? composite(to_f32(x[j]), j) : ~0ull;
        comp[j] = c;
        valid += c != ~0ull ? 1u : 0u;
    }
    const int n_cand = (int)block_sum_u32(valid, su);
    if (n_cand == 0) {
        if (threadIdx.x == 0) out[row] = 0;
        return;
    }
    // Bitonic sort, ascending composite = (logit desc, id asc). Pairs are disjoint per pass and
    // __syncthreads orders the global-memory passes within the block.
    for (int k = 2; k <= vpow2; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = threadIdx.x; i < vpow2; i += blockDim.x) {
                const int ixj = i ^ j;
                if (ixj > i) {
                    const u64 a = comp[i], b = comp[ixj];
                    const bool up = (i & k) == 0;
                    if ((a > b) == up) {
                        comp[i] = b;
                        comp[ixj] = a;
                    }
                }
            }
            __syncthreads();
        }
    }
    // Unsigned compare: the host clamps top_k to the vocabulary, and a value >= 2^31 must never
    // become a negative count here (it would index far outside the workspace).
    const int kc = (p.top_k > 0u && p.top_k < (u32)n_cand) ? (int)p.top_k : n_cand;
    const float maxv = to_f32(x[(int)(comp[0] & 0xffffffffu)]);
    // The CPU reference's weight, operation for operation: exp((logit - max) * (1 / T)).
    const float inv_t = 1.0f / p.temperature;
    auto w_sorted = [&](int i) { return expf((to_f32(x[(int)(comp[i] & 0xffffffffu)]) - maxv) * inv_t); };
    if (threadIdx.x < 32) {
        int keep = kc;
        if (p.top_p < 1.0f) {
            const float total = warp_seq_sum(kc, w_sorted);
            const float want = fmaxf(p.top_p, 0.0f) * total;
            const int at = warp_seq_find(kc, want, true, w_sorted);
            keep = at < 0 ? kc : at + 1;
        }
        if (threadIdx.x == 0) keep_sh = keep;
    }
    __syncthreads();
    const int keep = keep_sh;
    const u64 bound = comp[keep - 1];  // kept: composite <= bound
    const float u = sample_uniform(p.seed, p.step);
    if (keep <= SAMPLE_SMALL_KEPT) {
        // Few kept ids: gather them and sort by id in shared memory (bitonic over a power of 2).
        int kp = 1;
        while (kp < keep) kp <<= 1;
        for (int i = threadIdx.x; i < kp; i += blockDim.x) kept_ids[i] = i < keep ? (int)(comp[i] & 0xffffffffu) : 0x7fffffff;
        __syncthreads();
        for (int k = 2; k <= kp; k <<= 1) {
            for (int j = k >> 1; j > 0; j >>= 1) {
                for (int i = threadIdx.x; i < kp; i += blockDim.x) {
                    const int ixj = i ^ j;
                    if (ixj > i) {
                        const int a = kept_ids[i], b = kept_ids[ixj];
                        if ((a > b) == ((i & k) == 0)) {
                            kept_ids[i] = b;
                            kept_ids[ixj] = a;
                        }
                    }
                }
                __syncthreads();
            }
        }
        if (threadIdx.x < 32) {
            auto w_id = [&](int i) { return expf((to_f32(x[kept_ids[i]]) - maxv) * inv_t); };
            const float total = warp_seq_sum(keep, w_id);
            const int at = warp_seq_find(keep, u * total, false, w_id);
            if (threadIdx.x == 0) out[row] = kept_ids[at >= 0 ? at : keep - 1];
        }
        return;
    }
    // Many kept ids: walk the whole vocabulary in id order, weight 0 for ids not kept.
    if (threadIdx.x < 32) {
        auto w_all = [&](int j) {
            const float v = to_f32(x[j]);
            return composite(v, j) <= bound ? expf((v - maxv) * inv_t) : 0.0f;
        };
        const float total = warp_seq_sum(vocab, w_all);
        const int at = warp_seq_find(vocab, u * total, false, w_all);
        // Past the end by rounding: the last kept id, i.e. the largest id among comp[0..keep).
        int last = 0;
        for (int i = threadIdx.x; i < keep; i += 32) last = max(last, (int)(comp[i] & 0xffffffffu));
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) last = max(last, __shfl_xor_sync(0xffffffffu, last, o));
        if (threadIdx.x == 0) out[row] = at >= 0 ? at : last;
    }
}

#define ARGMAX(NAME, T) \
    extern "C" __global__ void __launch_bounds__(1024) NAME(const T* logits, int* out, int vocab) { argmax_impl<T>(logits, out, vocab); }
#define SAMPLE(NAME, T)                                                                                      \
    extern "C" __global__ void __launch_bounds__(1024) NAME(const T* logits, int* out, int vocab, int row0,  \
                                                            SampleBatch batch, u64* ws, int vpow2) {        \
        sample_impl<T>(logits, out, vocab, row0, batch, ws, vpow2);                                        \
    }
DJINN_FOR_FLOATS(ARGMAX, argmax)
DJINN_FOR_FLOATS(SAMPLE, sample)
