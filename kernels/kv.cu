// KV-cache writes and whole-block moves. Layout (crates/backend/src/kv.rs): blocks of
// `block_elems` elements, inside a block [layer][k|v][kv_head][token][head_dim].
#include "common.cuh"

// Block (t, kv) writes token t's K (kv = 0) or V (kv = 1), stored in `src_dt`, for every head
// into its slot. Negative slots are padding and are skipped; slots past the cache are skipped
// and reported (ERR_KV_SLOT).
template <typename T>
__device__ void kv_append_impl(const void* k, const void* v, int src_dt, T* cache, const int* __restrict__ slots,
                               int layer, int kv_heads, int head_dim, int block_tokens, i64 block_elems,
                               i64 num_blocks, unsigned* err) {
    const i64 t = blockIdx.x;
    const int kv = blockIdx.y;
    const int slot = slots[t];
    if (slot < 0) return;
    const i64 blk = slot / block_tokens;
    const int tok = slot % block_tokens;
    if (blk >= num_blocks) {
        if (threadIdx.x == 0) report(err, ERR_KV_SLOT);
        return;
    }
    const void* src = kv == 0 ? k : v;
    const i64 src0 = t * (i64)kv_heads * head_dim;
    for (int e = threadIdx.x; e < kv_heads * head_dim; e += blockDim.x) {
        const int h = e / head_dim, d = e % head_dim;
        const i64 off = blk * block_elems + ((((i64)layer * 2 + kv) * kv_heads + h) * block_tokens + tok) * head_dim + d;
        cache[off] = from_f32<T>(ld_dt(src, src_dt, src0 + e));
    }
}

#define KV_APPEND(NAME, T)                                                                                   \
    extern "C" __global__ void NAME(const void* k, const void* v, int src_dt, T* cache, const int* slots,   \
                                    int layer, int kv_heads, int head_dim, int block_tokens, i64 block_elems, \
                                    i64 num_blocks, unsigned* err) {                                       \
        kv_append_impl<T>(k, v, src_dt, cache, slots, layer, kv_heads, head_dim, block_tokens, block_elems,  \
                          num_blocks, err);                                                                \
    }
DJINN_FOR_FLOATS(KV_APPEND, kv_append)

// Moves whole blocks: block y copies src_base[src_id(y)] to dst_base[dst_id(y)], where an id is
// ids[y * stride] when `ids` is non-null, else y itself (the staging side of gather/scatter).
// Ids outside [0, limit) skip the move and report ERR_BLOCK_ID. W is the copy word:
// uint4 when every address and the block size are 16-byte aligned, else a byte.
template <typename W>
__device__ void block_move_impl(const unsigned char* src_base, const int* __restrict__ src_ids, int src_stride,
                                i64 src_limit, unsigned char* dst_base, const int* __restrict__ dst_ids,
                                int dst_stride, i64 dst_limit, i64 block_bytes, unsigned* err) {
    const i64 y = blockIdx.y;
    const i64 s = src_ids ? (i64)src_ids[y * src_stride] : y;
    const i64 d = dst_ids ? (i64)dst_ids[y * dst_stride] : y;
    if (s < 0 || s >= src_limit || d < 0 || d >= dst_limit) {
        if (blockIdx.x == 0 && threadIdx.x == 0) report(err, ERR_BLOCK_ID);
        return;
    }
    const W* src = reinterpret_cast<const W*>(src_base + s * block_bytes);
    W* dst = reinterpret_cast<W*>(dst_base + d * block_bytes);
    const i64 words = block_bytes / (i64)sizeof(W);
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < words; i += (i64)gridDim.x * blockDim.x) dst[i] = src[i];
}

extern "C" __global__ void block_move_v16(const unsigned char* src_base, const int* src_ids, int src_stride,
                                          i64 src_limit, unsigned char* dst_base, const int* dst_ids, int dst_stride,
                                          i64 dst_limit, i64 block_bytes, unsigned* err) {
    block_move_impl<uint4>(src_base, src_ids, src_stride, src_limit, dst_base, dst_ids, dst_stride, dst_limit,
                           block_bytes, err);
}
extern "C" __global__ void block_move_u8(const unsigned char* src_base, const int* src_ids, int src_stride,
                                         i64 src_limit, unsigned char* dst_base, const int* dst_ids, int dst_stride,
                                         i64 dst_limit, i64 block_bytes, unsigned* err) {
    block_move_impl<unsigned char>(src_base, src_ids, src_stride, src_limit, dst_base, dst_ids, dst_stride, dst_limit,
                                   block_bytes, err);
}
