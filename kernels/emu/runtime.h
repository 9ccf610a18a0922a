// What the emulated driver (driver.cpp) sees of the kernels: a registry of the host-compiled
// kernels (kernels.cpp) and the launch (fiber.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "emu.h"

namespace emu {

struct Kernel {
    const char* name;
    // Calls the kernel with `params[i]` pointing at its i-th argument (cuLaunchKernel's layout).
    void (*call)(void** params);
    // The kernel's __launch_bounds__: threads per block (1024 where it has none) and resident
    // blocks per SM (0 where it gives none).
    unsigned max_threads;
    int min_blocks;
    // A pure data move (dst[i] = src[i]): the check lets it load bytes nothing wrote, and its
    // store of such a load leaves the destination unwritten (KV blocks move with their unused
    // slots). Other kernels' loads of unwritten bytes are refused.
    bool moves_data = false;
};

// Calls kernel `f` with `params[i]` pointing at its i-th argument, as a GPU's launch unpacks the
// parameter array. Not instrumented for the check (check.cpp): the array is the host's memory,
// read before any kernel code runs; `noipa` keeps GCC from moving those reads into an
// instrumented caller.
template <typename... A, size_t... I>
__attribute__((no_sanitize("thread"), noipa)) void invoke(void (*f)(A...), void** params,
                                                           std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(params[I])...);
}
template <typename... A>
void invoke(void (*f)(A...), void** params) {
    invoke(f, params, std::index_sequence_for<A...>{});
}

// The kernel named `name`, or null.
const Kernel* find_kernel(const char* name);
// Every registered kernel, `count` of them.
const Kernel* kernels(size_t* count);

enum class Launch {
    Ok,
    Refused,  // bad geometry: nothing ran
    Hung,     // a block's barriers cannot complete
    Illegal,  // the check (check.cpp) refused an access: an illegal address or a race
};
// Runs the whole grid before returning; anything but Ok comes with `why`.
Launch launch(const Kernel& k, dim3e grid, dim3e block, size_t smem_bytes, void** params, std::string* why);

// The static shared-memory arena's size. A GPU caps a kernel's static shared memory at 48 KiB;
// here every kernel's declarations share the arena, so the cap is on their sum.
constexpr size_t STATIC_SMEM_BYTES = 48 << 10;

// Ends the running CUDA thread, and with it its block and launch (Launch::Illegal, `why` after
// the thread's index). Never returns.
[[noreturn]] void fail_thread(std::string why);

// Device allocations and mapped pinned host memory: every range a kernel may address.
struct MemRange {
    uintptr_t lo;
    size_t bytes;
    bool pinned_host;
    // Check builds, device allocations: a bit per byte, set once a copy, memset, GEMM or kernel
    // wrote it (a GPU's new memory holds whatever was there). Null: not tracked.
    unsigned char* written;
    // Check builds, device allocations: per 4-byte granule, the last kernel store — (barrier
    // interval << 14) | (thread << 4) | the bytes stored; 0 for none (check.cpp). Null: not tracked.
    uint64_t* stores;
};
void memory_ranges(std::vector<MemRange>* out);  // driver.cpp

// Bits [from, from + n) of a `written` map: set or clear them; whether all are set.
// A launch on one thread and a copy on another may mark bits that share a map byte: the partial
// bytes at the ends change atomically; whole bytes are stored (a copy may mark gigabytes).
inline void bits_fill(unsigned char* bits, size_t from, size_t n, bool on) {
    const auto one = [&](size_t i) {
        const unsigned char bit = (unsigned char)(1u << (i & 7));
        on ? __atomic_fetch_or(&bits[i >> 3], bit, __ATOMIC_RELAXED)
           : __atomic_fetch_and(&bits[i >> 3], (unsigned char)~bit, __ATOMIC_RELAXED);
    };
    size_t i = from;
    const size_t end = from + n;
    for (; i < end && (i & 7) != 0; ++i) one(i);
    if (end - i >= 8) {
        std::memset(bits + (i >> 3), on ? 0xff : 0, (end - i) >> 3);
        i += (end - i) & ~size_t{7};
    }
    for (; i < end; ++i) one(i);
}
inline void bits_set(unsigned char* bits, size_t from, size_t n) { bits_fill(bits, from, n, true); }
inline void bits_clear(unsigned char* bits, size_t from, size_t n) { bits_fill(bits, from, n, false); }
inline bool bits_all(const unsigned char* bits, size_t from, size_t n) {
    for (size_t i = from; i < from + n; ++i)
        if (!(bits[i >> 3] & (1u << (i & 7)))) return false;
    return true;
}

// What the scheduler tells the memory and race check (check.cpp; DJINN_EMU_CHECK builds only).
namespace check {
// A launch begins: its dynamic shared memory, and the fiber stacks (in [stacks_lo, stacks_hi),
// one per `slot_bytes`, each a guard page and then `stack_bytes` of stack). Accesses are checked
// from here to launch_ends.
void launch_begins(const Kernel& k, void* dyn, size_t dyn_bytes, char* stacks_lo, char* stacks_hi,
                   size_t slot_bytes, size_t stack_bytes);
void launch_ends();
void block_begins();
void block_synced();  // every live thread of the block passed a __syncthreads
void running(unsigned thread, char* stack_lo);
void static_smem_reserved(unsigned char* at, size_t bytes, const char* name);
}  // namespace check

}  // namespace emu
