// What the emulated driver (driver.cpp) sees of the kernels: a registry of the host-compiled
// kernels (kernels.cpp) and the launch (fiber.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
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
};

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
};
void memory_ranges(std::vector<MemRange>* out);  // driver.cpp

// Bits [from, from + n) of a `written` map: set them; whether all are set.
// Atomic: a launch on one thread and a copy on another may mark bytes that share a map byte.
inline void bits_set(unsigned char* bits, size_t from, size_t n) {
    for (size_t i = from; i < from + n; ++i) __atomic_fetch_or(&bits[i >> 3], (unsigned char)(1u << (i & 7)), __ATOMIC_RELAXED);
}
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
void launch_begins(void* dyn, size_t dyn_bytes, char* stacks_lo, char* stacks_hi, size_t slot_bytes,
                   size_t stack_bytes);
void launch_ends();
void block_begins();
void block_synced();  // every live thread of the block passed a __syncthreads
void running(unsigned thread, char* stack_lo);
void static_smem_reserved(unsigned char* at, size_t bytes, const char* name);
}  // namespace check

}  // namespace emu
