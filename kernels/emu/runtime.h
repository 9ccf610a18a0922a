// What the emulated driver (driver.cpp) sees of the kernels: a registry of the host-compiled
// kernels (kernels.cpp) and the launch (fiber.cpp).
#pragma once

#include <cstddef>
#include <string>

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

// Runs the whole grid before returning; false with `why` when the launch is refused (bad
// geometry) or a block's barriers cannot complete.
bool launch(const Kernel& k, dim3e grid, dim3e block, size_t smem_bytes, void** params, std::string* why);

}  // namespace emu
