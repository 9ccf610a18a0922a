// Shows that the emulator's check (check.cpp) catches what it claims to, on kernels written to
// break one rule each, and passes their correct twins: scripts/cuda-emu --check builds this
// (instrumented, as kernels.cpp is) and runs it before any suite. Exit 0 when every case has the
// expected outcome.
#include <cstdio>
#include <cstring>
#include <string>

#include "../common.cuh"
#include "runtime.h"

extern "C" int cuInit(unsigned);
extern "C" int cuMemAlloc_v2(unsigned long long* p, size_t bytes);
extern "C" int cuMemFree_v2(unsigned long long p);
extern "C" int cuMemsetD8_v2(unsigned long long p, unsigned char v, size_t n);
extern "C" int cuMemcpyHtoD_v2(unsigned long long d, const void* s, size_t n);

namespace {

// Thread i copies in[i + shift] to out[i]: shift 1 reads one element past `in`.
__global__ void copy_shifted(const float* in, float* out, int shift) {
    const int i = threadIdx.x;
    out[i] = in[i + shift];
}

// Each thread writes its slot, then reads the one before (thread 0 its own), with or without a
// barrier between.
__global__ void neighbour(float* out, int sync) {
    SHARED_ARRAY(float, slots, 64);
    const int t = threadIdx.x;
    slots[t] = (float)t;
    if (sync) __syncthreads();
    out[t] = slots[t > 0 ? t - 1 : 0];
}

// Lanes exchange through shared memory with only a shuffle between: shuffles do not order memory.
__global__ void shuffle_ordered(float* out) {
    SHARED_ARRAY(float, slots, 32);
    const int t = threadIdx.x;
    slots[t] = (float)t;
    const float v = __shfl_xor_sync(0xffffffffu, (float)t, 1);
    out[t] = slots[t ^ 1] + v;
}

// Reads shared memory nobody wrote in this block (block 1 reads what block 0 left: undefined).
__global__ void stale_shared(float* out, int write_first) {
    SHARED_ARRAY(float, slot, 1);
    if (threadIdx.x == 0 && (write_first || blockIdx.x == 0)) slot[0] = 1.0f;
    __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = slot[0];
}

// Dynamic shared memory: thread t writes element t of `n` the launch provides.
__global__ void dynamic_past(float* out, int n) {
    DYNAMIC_SMEM(float, buf);
    const int t = threadIdx.x;
    if (t <= n) buf[t] = 1.0f;  // t == n is one past the launch's bytes
    __syncthreads();
    out[t] = t < n ? buf[t] : 0.0f;
}

// Thread 1 reads thread 0's local variable through a pointer passed in shared memory.
__global__ void foreign_stack(float* out) {
    SHARED_ARRAY(float*, where, 1);
    volatile float mine = 3.0f;
    if (threadIdx.x == 0) where[0] = const_cast<float*>(&mine);
    __syncthreads();
    if (threadIdx.x == 1) out[0] = *where[0];
    __syncthreads();
}

// Thread 0 of every block stores to out[0]: blocks are unordered, so which store lands is chance.
__global__ void same_word(float* out) {
    if (threadIdx.x == 0) out[0] = (float)blockIdx.x;
}

// Thread t stores out[t], then (after a barrier, or not) reads its neighbour's out[t ^ 1].
__global__ void exchange_global(float* out, int sync) {
    const int t = threadIdx.x;
    out[t] = (float)t;
    if (sync) __syncthreads();
    out[32 + t] = out[t ^ 1];
}

// Thread t stores 16-bit element t: neighbours share 4-byte granules, not bytes.
__global__ void halves(unsigned short* out) { out[threadIdx.x] = (unsigned short)threadIdx.x; }

// Every thread ORs a bit into one device word: atomics are not races.
__global__ void atomics(unsigned* word) { atomicOr(word, 1u << (threadIdx.x % 32)); }

int failures = 0;

bool moves_data = false;  // the next launch's Kernel::moves_data

template <typename... A>
void expect(const char* name, void (*f)(A...), unsigned grid, unsigned block, size_t smem, const char* want,
            A... args) {
    void* values[] = {&args...};
    static void (*fn)(A...);
    fn = f;
    const emu::Kernel k{name, [](void** p) { emu::invoke(fn, p); }, 1024, 0, moves_data};
    moves_data = false;
    std::string why;
    const emu::Launch r = emu::launch(k, dim3e{grid, 1, 1}, dim3e{block, 1, 1}, smem, values, &why);
    const bool ok = want == nullptr ? r == emu::Launch::Ok
                                    : r == emu::Launch::Illegal && why.find(want) != std::string::npos;
    std::printf("%s %s%s%s\n", ok ? "ok  " : "FAIL", name, why.empty() ? "" : ": ", why.c_str());
    failures += !ok;
}

}  // namespace

int main() {
    cuInit(0);
    unsigned long long in_d, out_d, word_d, fresh_d;
    cuMemAlloc_v2(&in_d, 64 * sizeof(float));
    cuMemAlloc_v2(&out_d, 256 * sizeof(float));
    cuMemAlloc_v2(&word_d, sizeof(unsigned));
    cuMemAlloc_v2(&fresh_d, 64 * sizeof(float));
    auto* in = reinterpret_cast<const float*>(in_d);
    auto* out = reinterpret_cast<float*>(out_d);
    cuMemsetD8_v2(in_d, 0, 64 * sizeof(float));
    cuMemsetD8_v2(fresh_d, 0, 32 * sizeof(float));  // the first half only

    expect("copy in bounds", copy_shifted, 1, 64, 0, nullptr, in, out, 0);
    expect("copy one past the end", copy_shifted, 1, 64, 0, "4 B past the end of the 256 B device allocation", in,
           out, 1);
    expect("device memory half written", copy_shifted, 1, 64, 0,
           "uninitialized read: reads 4 B at offset 128 of the 256 B device allocation",
           reinterpret_cast<const float*>(fresh_d), out, 0);
    // A data move (KV blocks with unused slots) may copy unwritten bytes; they stay unwritten.
    unsigned long long moved_d;
    cuMemAlloc_v2(&moved_d, 64 * sizeof(float));
    auto* moved = reinterpret_cast<float*>(moved_d);
    moves_data = true;
    expect("a data move of a half-written buffer", copy_shifted, 1, 64, 0, nullptr,
           reinterpret_cast<const float*>(fresh_d), moved, 0);
    expect("reading the moved written half", copy_shifted, 1, 32, 0, nullptr, static_cast<const float*>(moved), out, 0);
    expect("reading the moved unwritten half", copy_shifted, 1, 64, 0,
           "uninitialized read: reads 4 B at offset 128 of the 256 B", static_cast<const float*>(moved), out, 0);
    cuMemFree_v2(moved_d);
    expect("neighbour with __syncthreads", neighbour, 1, 64, 0, nullptr, out, 1);
    expect("neighbour without a barrier", neighbour, 1, 64, 0,
           "shared-memory race: reads `slots` +0, which thread 0 wrote", out, 0);
    expect("lanes ordered by a shuffle only", shuffle_ordered, 1, 32, 0, "shared-memory race", out);
    expect("shared memory written in the block", stale_shared, 2, 32, 0, nullptr, out, 1);
    expect("shared memory left by another block", stale_shared, 2, 32, 0, "before any thread of this block wrote it",
           out, 0);
    expect("dynamic shared memory one past", dynamic_past, 1, 32, 16 * sizeof(float), "64 B into the launch's 64 B",
           out, 16);
    expect("another thread's stack", foreign_stack, 1, 32, 0, "in thread 0's stack", out);
    expect("one block stores to a word", same_word, 1, 32, 0, nullptr, out);
    expect("two blocks store to one word", same_word, 2, 32, 0, "thread 0 of another block of this launch wrote", out);
    expect("device memory exchanged after __syncthreads", exchange_global, 1, 32, 0, nullptr, out, 1);
    expect("device memory exchanged without a barrier", exchange_global, 1, 32, 0,
           "global-memory race: reads offset 0 of the 1024 B device allocation", out, 0);
    expect("16-bit stores by neighbouring threads", halves, 1, 64, 0, nullptr, reinterpret_cast<unsigned short*>(out));
    expect("atomics on one word", atomics, 1, 128, 0, nullptr, reinterpret_cast<unsigned*>(word_d));

    // The driver refuses a copy whose device side leaves its allocation (CUDA_ERROR_INVALID_VALUE).
    const unsigned char host[128] = {};
    const bool copy_refused = cuMemcpyHtoD_v2(in_d + 200, host, sizeof host) == 1;
    const bool copy_fits = cuMemcpyHtoD_v2(in_d + 128, host, sizeof host) == 0;
    std::printf("%s copy past an allocation refused, copy to its end taken\n",
                copy_refused && copy_fits ? "ok  " : "FAIL");
    failures += !(copy_refused && copy_fits);

    cuMemFree_v2(in_d);
    cuMemFree_v2(out_d);
    cuMemFree_v2(word_d);
    cuMemFree_v2(fresh_d);
    std::printf("cuda-emu check selftest: %s\n", failures == 0 ? "every case as expected" : "FAILED");
    return failures == 0 ? 0 : 1;
}
