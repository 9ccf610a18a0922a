// Elementwise ops, casts and the embedding gather, over any mix of storage dtypes (runtime
// dtype codes, see common.cuh). Grid-stride loops over `n` elements, so any grid size is
// correct. Ops are warp-uniform integers: binary 0 add, 1 sub, 2 mul, 3 div; unary 0 silu,
// 1 exp, 2 neg, 3 sqrt. `b` broadcasts over `a` when b_len < n (b_len divides n).
#include "common.cuh"

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

extern "C" __global__ void binary(int op, const void* a, int a_dt, const void* b, int b_dt, i64 b_len, void* out,
                                  int out_dt, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float x = ld_dt(a, a_dt, i);
        const float y = ld_dt(b, b_dt, b_len == n ? i : i % b_len);
        float r;
        switch (op) {
            case 0: r = x + y; break;
            case 1: r = x - y; break;
            case 2: r = x * y; break;
            default: r = x / y; break;
        }
        st_dt(out, out_dt, i, r);
    }
}

extern "C" __global__ void unary(int op, const void* x, int x_dt, void* out, int out_dt, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float v = ld_dt(x, x_dt, i);
        float r;
        switch (op) {
            case 0: r = silu(v); break;
            case 1: r = expf(v); break;
            case 2: r = -v; break;
            default: r = sqrtf(v); break;
        }
        st_dt(out, out_dt, i, r);
    }
}

// Conversions between f32/f16/bf16/i32 (i32 <- float truncates toward zero and saturates, the
// semantics of Rust `as`).
extern "C" __global__ void cast(const void* x, int x_dt, void* out, int out_dt, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        if (x_dt == DT_I32 && out_dt == DT_I32) {
            static_cast<int*>(out)[i] = static_cast<const int*>(x)[i];
        } else {
            st_dt(out, out_dt, i, ld_dt(x, x_dt, i));
        }
    }
}

extern "C" __global__ void silu_mul(const void* gate, int gate_dt, const void* up, int up_dt, void* out, int out_dt,
                                    i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        st_dt(out, out_dt, i, silu(ld_dt(gate, gate_dt, i)) * ld_dt(up, up_dt, i));
    }
}

// out[t, :] = table[ids[t], :]; block t. An id outside [0, vocab) writes a zero row and
// reports ERR_EMBEDDING_ID.
extern "C" __global__ void embedding(const void* table, int table_dt, const int* ids, void* out, int out_dt,
                                     i64 hidden, i64 vocab, unsigned* err) {
    const i64 t = blockIdx.x;
    const int id = ids[t];
    const bool ok = id >= 0 && (i64)id < vocab;
    if (!ok && threadIdx.x == 0) report(err, ERR_EMBEDDING_ID);
    for (i64 j = threadIdx.x; j < hidden; j += blockDim.x) {
        st_dt(out, out_dt, t * hidden + j, ok ? ld_dt(table, table_dt, (i64)id * hidden + j) : 0.0f);
    }
}
