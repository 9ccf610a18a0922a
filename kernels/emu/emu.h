// The CUDA device built-ins the kernels in kernels/ use, for a host (x86-64) compile of the
// same source: `g++ -include kernels/emu/emu.h -DDJINN_KERNEL_EMU` (scripts/cuda-emu).
//
// This is a test tool, not a backend: it runs the kernels' *logic* (indexing, shared-memory
// layout, barriers, warp shuffles, the reductions, the launch geometry the host code picks)
// on the CPU, so the CUDA backend's host code and kernels can be checked against the CPU
// backend on a machine without a GPU. It says nothing about a GPU's memory model, timing or
// performance, and a pass under it is never reported as a GPU pass.
//
// Model: one thread block at a time; each CUDA thread is a fiber (fiber.cpp) on the launching
// OS thread. `__syncthreads` parks a fiber until every live thread of the block has arrived;
// a warp shuffle parks it until every live lane of its warp has. Divergent barriers (a lane at
// a shuffle while another waits at `__syncthreads`) are reported as a failed launch.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
// Static shared memory is SHARED / SHARED_ARRAY (common.cuh): a function-local static would be one
// for every block, and out of the check's sight.
#define __shared__ __shared___use_SHARED_or_SHARED_ARRAY_from_common_cuh

struct dim3e {
    unsigned x, y, z;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};

namespace emu {
// The running fiber's thread index (a copy: kernel code reads no scheduler state in place); the
// launch's block index and dimensions (fiber.cpp).
dim3e thread_idx();
extern dim3e block_idx, block_dim, grid_dim;
// Dynamic shared memory of the running block (`extern __shared__ T name[]` in the kernels).
void* dynamic_smem();
// The static shared-memory arena, and a declaration's offset in it (reserved once per process).
unsigned char* static_smem();
size_t reserve_static_smem(size_t bytes, size_t align, const char* name);
void sync_block();
// Exchanges 64 bits with lane `src` of the calling warp; every live lane must call it.
uint64_t shuffle(uint64_t bits, int src);
}  // namespace emu

#define threadIdx (emu::thread_idx())
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::sync_block(); }

template <typename T>
inline uint64_t emu_bits(T v) {
    static_assert(sizeof(T) <= 8, "shuffle of more than 64 bits");
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <typename T>
inline T emu_from_bits(uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}
// Full-warp masks only: the kernels never shuffle in divergent code.
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    const int lane = (int)(threadIdx.x & 31);
    return emu_from_bits<T>(emu::shuffle(emu_bits(v), lane ^ lane_mask));
}
template <typename T>
inline T __shfl_sync(unsigned, T v, int src) {
    return emu_from_bits<T>(emu::shuffle(emu_bits(v), src & 31));
}

inline unsigned atomicOr(unsigned* p, unsigned v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }

inline float __int_as_float(int i) { return emu_from_bits<float>((uint32_t)i); }
inline float __int_as_float(unsigned i) { return emu_from_bits<float>(i); }
inline unsigned __float_as_uint(float f) { return (unsigned)emu_bits(f); }
// The device's rsqrtf is approximate (2 ulp); the CPU reference is what tests compare to.
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
using std::isinf;
using std::max;
using std::min;

// f16 / bf16 storage types with the device's conversions (round to nearest even).
struct __half {
    uint16_t bits;
};
struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __half2float(__half h) { return _cvtsh_ss(h.bits); }
inline __half __float2half_rn(float x) { return __half{(uint16_t)_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return emu_from_bits<float>((uint64_t)h.bits << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
    const uint32_t u = (uint32_t)emu_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40)};  // quiet NaN
    return __nv_bfloat16{(uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

// `cvt.rzi.sat.s32.f32`: toward zero, saturating, NaN to 0.
inline int emu_cvt_rzi_sat_s32(float v) {
    if (v != v) return 0;
    if (v >= 2147483647.0f) return 2147483647;
    if (v <= -2147483648.0f) return (-2147483647 - 1);
    return (int)v;
}
