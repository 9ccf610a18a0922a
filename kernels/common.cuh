// Shared helpers for every kernel module. build.rs inlines this file into each module before
// compiling (so NVRTC needs no include path for it), and the runtime NVRTC fallback sees the
// same inlined text.
//
// Storage dtypes are f32, f16 (__half) and bf16 (__nv_bfloat16); all arithmetic is f32.

#ifndef DJINN_COMMON_CUH
#define DJINN_COMMON_CUH

// DJINN_KERNEL_EMU: the host compile of kernels/emu (scripts/cuda-emu), which defines these types.
#ifndef DJINN_KERNEL_EMU
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif

#define NEG_INF (__int_as_float(0xff800000u))
typedef long long i64;
typedef unsigned long long u64;
typedef unsigned int u32;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Sixteen bytes of storage widened to f32: VEC = 4 (f32) or 8 (f16/bf16) elements.
template <typename T> struct Vec16 { static constexpr int N = 16 / sizeof(T); };

template <typename T>
__device__ __forceinline__ void load16(const T* __restrict__ p, float* out) {
    uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < Vec16<T>::N; ++i) out[i] = to_f32(e[i]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide reductions for blockDim.x a multiple of 32 and <= 1024. `scratch` holds 32 floats.
// The summation order is fixed (lane tree, then warp tree), so results are bit-reproducible.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    v = warp_sum(v);
    return v;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : NEG_INF;
    v = warp_max(v);
    return v;
}

__device__ __forceinline__ u32 block_sum_u32(u32 v, u32* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0u;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Runtime storage-dtype codes (the host passes them; branches on them are warp-uniform):
// 0 f32, 1 f16, 2 bf16, 3 i32. Loads widen to f32; stores round (i32: truncate, saturate, NaN 0).
#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2
#define DT_I32 3

__device__ __forceinline__ float ld_dt(const void* p, int dt, i64 i) {
    switch (dt) {
        case DT_F32: return static_cast<const float*>(p)[i];
        case DT_F16: return __half2float(static_cast<const __half*>(p)[i]);
        case DT_BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
        default: return (float)static_cast<const int*>(p)[i];
    }
}

__device__ __forceinline__ void st_dt(void* p, int dt, i64 i, float v) {
    switch (dt) {
        case DT_F32: static_cast<float*>(p)[i] = v; break;
        case DT_F16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
        case DT_BF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
        default: {
            int r;
#ifdef DJINN_KERNEL_EMU
            r = emu_cvt_rzi_sat_s32(v);
#else
            asm("cvt.rzi.sat.s32.f32 %0, %1;" : "=r"(r) : "f"(v));
#endif
            static_cast<int*>(p)[i] = r;
        }
    }
}

// Device-side input checks: bits OR-ed into the backend's error word (mapped pinned host
// memory), reported by the next synchronisation. The host validates what it can before launch.
#define ERR_EMBEDDING_ID 1u
#define ERR_KV_SLOT 2u
#define ERR_BLOCK_ID 4u

__device__ __forceinline__ void report(unsigned* err, unsigned bit) {
    if (err) atomicOr(err, bit);
}

// The launch's dynamic shared memory as `T name[]`.
#ifdef DJINN_KERNEL_EMU
#define DYNAMIC_SMEM(T, name) T* name = static_cast<T*>(emu::dynamic_smem())
#else
#define DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#endif

// Static shared memory: `SHARED_ARRAY(T, name, N)` is `__shared__ T name[N]`, `SHARED(T, name)`
// is `__shared__ T name`. In the emulator each declaration has its own range of a block-wide arena.
#ifdef DJINN_KERNEL_EMU
#define SHARED_ARRAY(T, name, N)                                                                        \
    static const size_t name##_emu_at = emu::reserve_static_smem(sizeof(T) * (N), alignof(T), #name); \
    T* const name = reinterpret_cast<T*>(emu::static_smem() + name##_emu_at)
#define SHARED(T, name) \
    SHARED_ARRAY(T, name##_emu_one, 1); \
    T& name = *name##_emu_one
#else
#define SHARED_ARRAY(T, name, N) __shared__ T name[N]
#define SHARED(T, name) __shared__ T name
#endif

// Instantiates `NAME##_f32/_f16/_bf16` from a macro body taking the storage type.
#define DJINN_FOR_FLOATS(M, NAME) M(NAME##_f32, float) M(NAME##_f16, __half) M(NAME##_bf16, __nv_bfloat16)

#endif  // DJINN_COMMON_CUH
