// Row-wise ops over any mix of storage dtypes: RMSNorm (optionally fused with the residual
// add), softmax, and rotate-half RoPE. One thread block per row (RoPE: per token).
#include "common.cuh"

// With `residual` non-null: residual += x (rounded to the residual's dtype, as the CPU
// reference does), then out = residual * rsqrt(mean(residual^2) + eps) * weight. Without: the
// same over x. `out` may be `x` (in place): each thread reads its elements before writing them.
extern "C" __global__ void rms_norm(const void* x, int x_dt, void* residual, int res_dt, const void* weight, int w_dt,
                                    void* out, int out_dt, int hidden, float eps) {
    SHARED_ARRAY(float, scratch, 32);
    const i64 base = (i64)blockIdx.x * hidden;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
        float v = ld_dt(x, x_dt, base + j);
        if (residual) {
            st_dt(residual, res_dt, base + j, ld_dt(residual, res_dt, base + j) + v);
            v = ld_dt(residual, res_dt, base + j);  // the rounded sum
        }
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)hidden + eps);
    // Each thread re-reads exactly the elements it handled above, so no barrier is needed.
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
        const float v = residual ? ld_dt(residual, res_dt, base + j) : ld_dt(x, x_dt, base + j);
        st_dt(out, out_dt, base + j, v * inv * ld_dt(weight, w_dt, j));
    }
}

// `out` may be `x`: every element is read in the first two passes before the barrier inside
// block_sum, and the third pass reads only the element the same thread then writes.
extern "C" __global__ void softmax(const void* x, int x_dt, void* out, int out_dt, int cols) {
    SHARED_ARRAY(float, scratch, 32);
    const i64 base = (i64)blockIdx.x * cols;
    float m = NEG_INF;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) m = fmaxf(m, ld_dt(x, x_dt, base + j));
    m = block_max(m, scratch);
    float s = 0.0f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) s += expf(ld_dt(x, x_dt, base + j) - m);
    s = block_sum(s, scratch);
    const float inv = 1.0f / s;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) st_dt(out, out_dt, base + j, expf(ld_dt(x, x_dt, base + j) - m) * inv);
}

// x: [tokens, heads, head_dim] in place. Block = one token; threads over (head, i < head_dim/2).
// angle = position * inv_freq[i] in f32; (x_i, x_{i+half}) -> (x_i c - x_{i+half} s, x_{i+half} c + x_i s).
extern "C" __global__ void rope(void* x, int x_dt, const int* positions, const float* inv_freq, int heads,
                                int head_dim) {
    const i64 t = blockIdx.x;
    const int half = head_dim / 2;
    const float pos = (float)positions[t];
    for (int k = threadIdx.x; k < heads * half; k += blockDim.x) {
        const int h = k / half, i = k % half;
        float s, c;
        sincosf(pos * inv_freq[i], &s, &c);
        const i64 row = (t * heads + h) * head_dim;
        const float a = ld_dt(x, x_dt, row + i), b = ld_dt(x, x_dt, row + i + half);
        st_dt(x, x_dt, row + i, a * c - b * s);
        st_dt(x, x_dt, row + i + half, b * c + a * s);
    }
}
