// The kernels of kernels/*.cu compiled for the host, and their registry: each entry unpacks
// cuLaunchKernel's parameter array with the kernel's own C signature, as the driver does from
// the image's parameter layout — a host argument of the wrong size or order reads as garbage
// here as it would on a GPU.
#include <cstring>

#include "runtime.h"

#include "../attention.cu"
#include "../elementwise.cu"
#include "../kv.cu"
#include "../norm.cu"
#include "../sampling.cu"

namespace {

// Launch bounds as the kernels declare them (attention.cu DECODE: MINB 4, 4, 3, 2).
#define KB(NAME, MAXT, MINB) {#NAME, [](void** p) { emu::invoke(NAME, p); }, MAXT, MINB}
#define KMOVE(NAME, MAXT) {#NAME, [](void** p) { emu::invoke(NAME, p); }, MAXT, 0, true}
#define K(NAME, MAXT) KB(NAME, MAXT, 0)
#define K3(NAME, MAXT) K(NAME##_f32, MAXT), K(NAME##_f16, MAXT), K(NAME##_bf16, MAXT)
#define DECODE_G(DT) KB(paged_decode_##DT##_g1, 128, 4), KB(paged_decode_##DT##_g2, 128, 4), \
    KB(paged_decode_##DT##_g4, 128, 3), KB(paged_decode_##DT##_g8, 128, 2)

const emu::Kernel REGISTRY[] = {
    DECODE_G(f32), DECODE_G(f16), DECODE_G(bf16),
    K(decode_reduce, 1024),
    K3(prefill, 128),
    K(binary, 1024), K(unary, 1024), K(cast, 1024), K(silu_mul, 1024), K(embedding, 1024),
    K(rms_norm, 1024), K(softmax, 1024), K(rope, 1024),
    K3(kv_append, 1024),
    KMOVE(block_move_v16, 1024), KMOVE(block_move_u8, 1024),
    K3(argmax, 1024),
    K3(sample, 1024),
};

}  // namespace

namespace emu {

const Kernel* find_kernel(const char* name) {
    for (const Kernel& k : REGISTRY)
        if (std::strcmp(k.name, name) == 0) return &k;
    return nullptr;
}

const Kernel* kernels(size_t* count) {
    *count = sizeof(REGISTRY) / sizeof(REGISTRY[0]);
    return REGISTRY;
}

}  // namespace emu
