// Attention over the paged KV cache (layout in crates/backend/src/kv.rs: inside a block
// [layer][k|v][kv_head][token][head_dim], so one head's tokens are contiguous).
//
// * paged_decode_<dt>_g<GP>: the sequences with exactly one query row (others are skipped, so a
//   mixed step sends its decode rows here and its multi-row sequences to prefill_<dt>). Grid (kv_head, seq, partition): each
//   thread block streams one partition of the context for one KV head exactly once and serves
//   all G = heads / kv_heads query heads of that group from the same loads (GP >= G is the
//   register-array bound). Each token is read by a group of `lpt` lanes with 16-byte loads.
//   Online softmax in the log2 domain. With one partition the block writes the output; with
//   several it writes (max, sum, unnormalised acc) partials and decode_reduce_<dt> combines
//   them (split-K over long contexts).
// * prefill_<dt>: the sequences with at least `min_rows` query rows (1: all of them — prefill,
//   and decode shapes the decode kernel does not cover; 2: the multi-row part of a mixed step). Causal, GQA by head mapping, key tiles staged in
//   shared memory in f32, online softmax; one warp per 4 query rows, 16 rows per block.
#include "common.cuh"

template <typename T, int GP>
__device__ void paged_decode_impl(const void* __restrict__ q, int q_dt, const T* __restrict__ cache,
                                  i64 num_blocks, const int* __restrict__ q_start, const int* __restrict__ ctx_lens,
                                  const int* __restrict__ block_tables, int max_blocks, void* __restrict__ out,
                                  int out_dt, float* __restrict__ ws_acc, float* __restrict__ ws_ml, int heads,
                                  int kv_heads, int head_dim, int block_tokens, i64 block_elems, int layer,
                                  int part_tokens, int lpt, float scale_log2, unsigned* err) {
    constexpr int VEC = Vec16<T>::N;
    DYNAMIC_SMEM(float, smem);
    const int kvh = blockIdx.x, seq = blockIdx.y, part = blockIdx.z, num_parts = gridDim.z;
    if (q_start[seq + 1] - q_start[seq] != 1) return;  // not a decode row: prefill_<dt> covers it
    const int G = heads / kv_heads;
    const int ctx = ctx_lens[seq];
    const i64 row = q_start[seq];
    const int p0 = part * part_tokens;
    const int p1 = min(ctx, p0 + part_tokens);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int tpw = 32 / lpt;  // tokens in flight per warp
    const int sub = lane / lpt, li = lane % lpt;
    const int ng = (blockDim.x >> 5) * tpw;  // token groups per block
    const int grp = warp * tpw + sub;
    const bool dim_ok = li * VEC < head_dim;

    // This partition's slice of the block table (part_tokens is a multiple of block_tokens).
    int* tab = reinterpret_cast<int*>(smem);
    const int ntab = part_tokens / block_tokens;
    for (int i = threadIdx.x; i < ntab; i += blockDim.x) {
        const int bi = p0 / block_tokens + i;
        int id = bi < max_blocks ? block_tables[(i64)seq * max_blocks + bi] : 0;
        if (id < 0 || id >= num_blocks) {
            // Only blocks inside the context matter; a bad id there is reported and read as 0.
            if ((i64)bi * block_tokens < ctx) report(err, ERR_BLOCK_ID);
            id = 0;
        }
        tab[i] = id;
    }
    float* sm_m = smem + ((ntab + 3) & ~3);
    float* sm_l = sm_m + ng * GP;
    float* sm_acc = sm_l + ng * GP;

    float qr[GP][VEC];
#pragma unroll
    for (int g = 0; g < GP; ++g) {
        if (g < G && dim_ok) {
            const i64 q0 = (row * heads + (i64)kvh * G + g) * head_dim + li * VEC;
#pragma unroll
            for (int i = 0; i < VEC; ++i) qr[g][i] = ld_dt(q, q_dt, q0 + i);
        } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) qr[g][i] = 0.0f;
        }
    }
    __syncthreads();

    float m[GP], l[GP], acc[GP][VEC];
#pragma unroll
    for (int g = 0; g < GP; ++g) {
        m[g] = NEG_INF;
        l[g] = 0.0f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[g][i] = 0.0f;
    }

    const i64 k_head = (((i64)layer * 2 + 0) * kv_heads + kvh) * block_tokens * head_dim;
    const i64 v_head = (((i64)layer * 2 + 1) * kv_heads + kvh) * block_tokens * head_dim;
    auto load_kv = [&](int t, float* kf, float* vf) {
        if (t < p1 && dim_ok) {
            const int rel = t - p0;
            const i64 blk = tab[rel / block_tokens];
            const i64 tok_off = (i64)(rel % block_tokens) * head_dim + li * VEC;
            const T* bp = cache + blk * block_elems;
            load16(bp + k_head + tok_off, kf);
            load16(bp + v_head + tok_off, vf);
        } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) kf[i] = vf[i] = 0.0f;
        }
    };
    auto step = [&](bool valid, const float* kf, const float* vf) {
#pragma unroll
        for (int g = 0; g < GP; ++g) {
            float s = 0.0f;
#pragma unroll
            for (int i = 0; i < VEC; ++i) s += qr[g][i] * kf[i];
            for (int o = lpt >> 1; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
            if (valid && g < G) {
                s *= scale_log2;
                if (s > m[g]) {
                    const float c = exp2f(m[g] - s);
                    l[g] = l[g] * c + 1.0f;
#pragma unroll
                    for (int i = 0; i < VEC; ++i) acc[g][i] = acc[g][i] * c + vf[i];
                    m[g] = s;
                } else {
                    const float p = exp2f(s - m[g]);
                    l[g] += p;
#pragma unroll
                    for (int i = 0; i < VEC; ++i) acc[g][i] += p * vf[i];
                }
            }
        }
    };
    // The loop bound is uniform per warp (base advances by whole warps), so every lane reaches
    // every shuffle; lanes past the end carry `valid = false`. Two tokens per group per trip:
    // both tokens' K and V loads are issued before either is consumed, doubling the bytes in
    // flight (decode is bound by memory latency × parallelism, not arithmetic).
    for (int base = p0 + warp * tpw; base < p1; base += 2 * ng) {
        const int t0 = base + sub, t1 = base + ng + sub;
        float k0[VEC], v0[VEC], k1[VEC], v1[VEC];
        load_kv(t0, k0, v0);
        load_kv(t1, k1, v1);
        step(t0 < p1, k0, v0);
        step(t1 < p1, k1, v1);
    }

    // Combine the token groups of this block.
#pragma unroll
    for (int g = 0; g < GP; ++g) {
        if (g < G) {
            if (li == 0) {
                sm_m[grp * GP + g] = m[g];
                sm_l[grp * GP + g] = l[g];
            }
            if (dim_ok) {
#pragma unroll
                for (int i = 0; i < VEC; ++i) sm_acc[(i64)(grp * GP + g) * head_dim + li * VEC + i] = acc[g][i];
            }
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < G * head_dim; idx += blockDim.x) {
        const int g = idx / head_dim, d = idx % head_dim;
        float M = NEG_INF;
        for (int j = 0; j < ng; ++j) M = fmaxf(M, sm_m[j * GP + g]);
        float L = 0.0f, A = 0.0f;
        if (M != NEG_INF) {
            for (int j = 0; j < ng; ++j) {
                const float mj = sm_m[j * GP + g];
                if (mj == NEG_INF) continue;
                const float w = exp2f(mj - M);
                L += w * sm_l[j * GP + g];
                A += w * sm_acc[(i64)(j * GP + g) * head_dim + d];
            }
        }
        const int h = kvh * G + g;
        if (num_parts == 1) {
            st_dt(out, out_dt, (row * heads + h) * head_dim + d, L > 0.0f ? A / L : 0.0f);
        } else {
            const i64 wi = ((i64)seq * heads + h) * num_parts + part;
            ws_acc[wi * head_dim + d] = A;
            if (d == 0) {
                ws_ml[wi * 2] = M;
                ws_ml[wi * 2 + 1] = L;
            }
        }
    }
}

// Grid (head, seq): combines the partitions of one (sequence, head).
extern "C" __global__ void decode_reduce(const float* __restrict__ ws_acc, const float* __restrict__ ws_ml,
                                        const int* __restrict__ q_start, void* __restrict__ out, int out_dt,
                                        int heads, int head_dim, int num_parts) {
    const int h = blockIdx.x, seq = blockIdx.y;
    if (q_start[seq + 1] - q_start[seq] != 1) return;  // skipped by paged_decode as well
    const i64 base = ((i64)seq * heads + h) * num_parts;
    const i64 row = q_start[seq];
    float M = NEG_INF;
    for (int p = 0; p < num_parts; ++p) M = fmaxf(M, ws_ml[(base + p) * 2]);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float A = 0.0f, L = 0.0f;
        if (M != NEG_INF) {
            for (int p = 0; p < num_parts; ++p) {
                const float mp = ws_ml[(base + p) * 2];
                if (mp == NEG_INF) continue;
                const float w = exp2f(mp - M);
                A += w * ws_acc[(base + p) * head_dim + d];
                L += w * ws_ml[(base + p) * 2 + 1];
            }
        }
        st_dt(out, out_dt, (row * heads + h) * head_dim + d, L > 0.0f ? A / L : 0.0f);
    }
}

#define PREFILL_ROWS_PER_WARP 4
#define PREFILL_WARPS 4
#define PREFILL_ROWS (PREFILL_ROWS_PER_WARP * PREFILL_WARPS)
#define PREFILL_MAX_DIMS_PER_LANE 8  // head_dim <= 256

// Grid (row tile, head, seq); block 128 threads. Dynamic shared memory:
// q [16][head_dim] + K [kt][head_dim + 1] (padded: lane j reads key j without bank conflicts)
// + V [kt][head_dim], all f32.
template <typename T>
__device__ void prefill_impl(const void* __restrict__ q, int q_dt, const T* __restrict__ cache, i64 num_blocks,
                             const int* __restrict__ q_start, const int* __restrict__ ctx_lens,
                             const int* __restrict__ block_tables, int max_blocks, void* __restrict__ out, int out_dt,
                             int heads, int kv_heads, int head_dim, int block_tokens, i64 block_elems, int layer,
                             int kt, int min_rows, float scale_log2, unsigned* err) {
    DYNAMIC_SMEM(float, smem);
    const int seq = blockIdx.z, h = blockIdx.y;
    const int kvh = h / (heads / kv_heads);
    const int r0 = q_start[seq];
    const int qlen = q_start[seq + 1] - r0;
    const int ctx = ctx_lens[seq];
    const int tile_r = blockIdx.x * PREFILL_ROWS;
    if (tile_r >= qlen || qlen < min_rows) return;
    const int pos0 = ctx - qlen;  // position of query row 0
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int kmax = min(pos0 + min(tile_r + PREFILL_ROWS, qlen) - 1, ctx - 1);
    const int kstride = head_dim + 1;
    float* qs = smem;
    float* ks = qs + PREFILL_ROWS * head_dim;
    float* vs = ks + kt * kstride;

    for (int idx = threadIdx.x; idx < PREFILL_ROWS * head_dim; idx += blockDim.x) {
        const int r = idx / head_dim, d = idx % head_dim;
        const int ri = tile_r + r;
        qs[idx] = ri < qlen ? ld_dt(q, q_dt, ((i64)(r0 + ri) * heads + h) * head_dim + d) * scale_log2 : 0.0f;
    }

    float acc[PREFILL_ROWS_PER_WARP][PREFILL_MAX_DIMS_PER_LANE];
    float m[PREFILL_ROWS_PER_WARP], l[PREFILL_ROWS_PER_WARP];
#pragma unroll
    for (int i = 0; i < PREFILL_ROWS_PER_WARP; ++i) {
        m[i] = NEG_INF;
        l[i] = 0.0f;
#pragma unroll
        for (int c = 0; c < PREFILL_MAX_DIMS_PER_LANE; ++c) acc[i][c] = 0.0f;
    }
    const i64 k_head = (((i64)layer * 2 + 0) * kv_heads + kvh) * block_tokens * head_dim;
    const i64 v_head = (((i64)layer * 2 + 1) * kv_heads + kvh) * block_tokens * head_dim;

    for (int kb = 0; kb <= kmax; kb += kt) {
        __syncthreads();  // previous tile fully consumed (and q staged, on the first pass)
        for (int idx = threadIdx.x; idx < kt * head_dim; idx += blockDim.x) {
            const int j = idx / head_dim, d = idx % head_dim;
            const int p = kb + j;
            float kv = 0.0f, vv = 0.0f;
            const int bi = p / block_tokens;
            if (p <= kmax && bi < max_blocks) {
                i64 blk = block_tables[(i64)seq * max_blocks + bi];
                if (blk < 0 || blk >= num_blocks) {
                    if (d == 0) report(err, ERR_BLOCK_ID);
                    blk = 0;
                }
                const i64 off = blk * block_elems + (i64)(p % block_tokens) * head_dim + d;
                kv = to_f32(cache[off + k_head]);
                vv = to_f32(cache[off + v_head]);
            }
            ks[j * kstride + d] = kv;
            vs[j * head_dim + d] = vv;
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < PREFILL_ROWS_PER_WARP; ++i) {
            const int r = warp * PREFILL_ROWS_PER_WARP + i;
            const int ri = tile_r + r;
            if (ri >= qlen) break;  // warp-uniform
            const int rpos = pos0 + ri;
            const int p = kb + lane;
            float s = NEG_INF;
            if (lane < kt && p <= rpos && p <= kmax) {
                const float* qr = qs + r * head_dim;
                const float* kr = ks + lane * kstride;
                float dot = 0.0f;
                for (int d = 0; d < head_dim; ++d) dot += qr[d] * kr[d];
                s = dot;
            }
            const float mt = warp_max(s);
            if (mt == NEG_INF) continue;  // no visible key in this tile for this row (uniform)
            const float m_new = fmaxf(m[i], mt);
            const float corr = exp2f(m[i] - m_new);
            const float pr = exp2f(s - m_new);
            l[i] = l[i] * corr + warp_sum(pr);
#pragma unroll
            for (int c = 0; c < PREFILL_MAX_DIMS_PER_LANE; ++c) acc[i][c] *= corr;
            for (int j = 0; j < kt; ++j) {
                const float pj = __shfl_sync(0xffffffffu, pr, j);
                const float* vr = vs + j * head_dim;
#pragma unroll
                for (int c = 0; c < PREFILL_MAX_DIMS_PER_LANE; ++c) {
                    const int d = lane + 32 * c;
                    if (d < head_dim) acc[i][c] += pj * vr[d];
                }
            }
            m[i] = m_new;
        }
    }
#pragma unroll
    for (int i = 0; i < PREFILL_ROWS_PER_WARP; ++i) {
        const int ri = tile_r + warp * PREFILL_ROWS_PER_WARP + i;
        if (ri >= qlen) break;
        const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
#pragma unroll
        for (int c = 0; c < PREFILL_MAX_DIMS_PER_LANE; ++c) {
            const int d = lane + 32 * c;
            if (d < head_dim) st_dt(out, out_dt, ((i64)(r0 + ri) * heads + h) * head_dim + d, acc[i][c] * inv);
        }
    }
}

#define DECODE_ONE(NAME, T, GP, MINB)                                                                        \
    extern "C" __global__ void __launch_bounds__(128, MINB)                                                \
        NAME(const void* q, int q_dt, const T* cache, i64 num_blocks, const int* q_start, const int* ctx_lens, \
             const int* block_tables, int max_blocks, void* out, int out_dt, float* ws_acc, float* ws_ml,   \
             int heads, int kv_heads, int head_dim, int block_tokens, i64 block_elems, int layer,          \
             int part_tokens, int lpt, float scale_log2, unsigned* err) {                                  \
        paged_decode_impl<T, GP>(q, q_dt, cache, num_blocks, q_start, ctx_lens, block_tables, max_blocks, out, \
                                 out_dt, ws_acc, ws_ml, heads, kv_heads, head_dim, block_tokens, block_elems, \
                                 layer, part_tokens, lpt, scale_log2, err);                               \
    }
// MINB: resident blocks per SM the register budget must allow (more query heads, more registers).
#define DECODE(NAME, T)                                                                                      \
    DECODE_ONE(NAME##_g1, T, 1, 4) DECODE_ONE(NAME##_g2, T, 2, 4) DECODE_ONE(NAME##_g4, T, 4, 3)                \
    DECODE_ONE(NAME##_g8, T, 8, 2)
#define PREFILL(NAME, T)                                                                                     \
    extern "C" __global__ void __launch_bounds__(128)                                                      \
        NAME(const void* q, int q_dt, const T* cache, i64 num_blocks, const int* q_start, const int* ctx_lens, \
             const int* block_tables, int max_blocks, void* out, int out_dt, int heads, int kv_heads,        \
             int head_dim, int block_tokens, i64 block_elems, int layer, int kt, int min_rows,              \
             float scale_log2, unsigned* err) {                                                            \
        prefill_impl<T>(q, q_dt, cache, num_blocks, q_start, ctx_lens, block_tables, max_blocks, out, out_dt,  \
                        heads, kv_heads, head_dim, block_tokens, block_elems, layer, kt, min_rows, scale_log2, \
                        err);                                                                              \
    }
DJINN_FOR_FLOATS(DECODE, paged_decode)
DJINN_FOR_FLOATS(PREFILL, prefill)
