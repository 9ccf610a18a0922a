// libcuda.so.1 for the kernel emulator: the driver API subset cudarc and the CUDA backend call,
// over host memory, with one emulated device ("djinn cuda-emu (CPU)", sm_90-like limits).
//
// Semantics: device memory is host memory (a device pointer is the host address); every copy
// and launch runs to completion before the call returns, so streams and events are always
// complete and stream order holds trivially. What a real driver refuses at launch is refused
// here too — a block over the kernel's __launch_bounds__, dynamic shared memory over 48 KiB
// without CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES or over the device's opt-in limit, a
// grid over the device's dimensions — and a kernel the loaded images do not contain is
// CUDA_ERROR_NOT_FOUND. New device allocations are filled with 0xff bytes (NaN floats,
// -1 ints) up to 64 MiB, because a GPU's are not zeroed.
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "runtime.h"

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;

enum : int {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    INVALID_DEVICE = 101,
    INVALID_IMAGE = 200,
    INVALID_HANDLE = 400,
    NOT_FOUND = 500,
    NOT_READY = 600,
    ILLEGAL_ADDRESS = 700,
    LAUNCH_OUT_OF_RESOURCES = 701,
    LAUNCH_FAILED = 719,
    NOT_SUPPORTED = 801,
};

namespace {

// H100-like limits, so the host code's launch plans meet the constraints it will meet there.
constexpr int SM_COUNT = 132;
constexpr int SMEM_DEFAULT = 48 * 1024;
constexpr int SMEM_OPTIN = 227 * 1024;
constexpr size_t POISON_LIMIT = 64u << 20;

struct Ctx {
    int id;
};
Ctx primary{0};
thread_local Ctx* current_ctx = nullptr;

size_t memory_bytes() {
    static const size_t bytes = [] {
        const char* v = std::getenv("DJINN_CUDA_EMU_MEM_MB");
        return (v ? std::strtoull(v, nullptr, 10) : 8192ull) << 20;
    }();
    return bytes;
}
std::atomic<size_t> allocated{0};

struct Alloc {
    void* ptr;
    size_t len;
    unsigned char* written;  // check builds, device memory: see emu::MemRange
    uint64_t* stores;        // likewise
};
std::mutex allocs_lock;
std::vector<Alloc> allocs;       // device
std::vector<Alloc> host_allocs;  // pinned

struct Function {
    const emu::Kernel* kernel;
    int max_dynamic_smem = SMEM_DEFAULT;
};
struct Module {
    std::vector<Function> functions;
};

const char* error_name(CUresult r) {
    switch (r) {
        case SUCCESS: return "CUDA_SUCCESS";
        case INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
        case OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
        case INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
        case INVALID_IMAGE: return "CUDA_ERROR_INVALID_IMAGE";
        case INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
        case NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
        case NOT_READY: return "CUDA_ERROR_NOT_READY";
        case ILLEGAL_ADDRESS: return "CUDA_ERROR_ILLEGAL_ADDRESS";
        case LAUNCH_OUT_OF_RESOURCES: return "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES";
        case LAUNCH_FAILED: return "CUDA_ERROR_LAUNCH_FAILED";
        case NOT_SUPPORTED: return "CUDA_ERROR_NOT_SUPPORTED";
        default: return "CUDA_ERROR_UNKNOWN";
    }
}

// The image's length: a cubin (ELF64) ends at its section header table; PTX is NUL-terminated.
size_t image_len(const unsigned char* img) {
    if (std::memcmp(img, "\x7f" "ELF", 4) == 0) {
        uint64_t shoff;
        uint16_t shentsize, shnum;
        std::memcpy(&shoff, img + 0x28, 8);
        std::memcpy(&shentsize, img + 0x3a, 2);
        std::memcpy(&shnum, img + 0x3c, 2);
        return shoff + (size_t)shentsize * shnum;
    }
    return std::strlen(reinterpret_cast<const char*>(img));
}

bool ident(unsigned char c) { return c == '_' || (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

// Whether the image names `name` as a whole identifier (PTX `.entry name(`, a cubin's symbol).
bool image_has(const unsigned char* img, size_t len, const char* name) {
    const size_t n = std::strlen(name);
    for (size_t i = 0; i + n <= len; ++i) {
        if (img[i] != (unsigned char)name[0] || std::memcmp(img + i, name, n) != 0) continue;
        const bool before = i == 0 || !ident(img[i - 1]);
        const bool after = i + n == len || !ident(img[i + n]);
        if (before && after) return true;
    }
    return false;
}

// Check builds: the size of an allocation's `stores` map (a u64 per 4 bytes).
size_t stores_bytes(size_t bytes) { return (bytes + 3) / 4 * sizeof(uint64_t); }

void* host_alloc(size_t bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? nullptr : p;
}

}  // namespace

namespace emu {
void memory_ranges(std::vector<MemRange>* out) {
    out->clear();
    std::lock_guard<std::mutex> hold(allocs_lock);
    for (const Alloc& a : allocs)
        out->push_back(MemRange{reinterpret_cast<uintptr_t>(a.ptr), a.len, false, a.written, a.stores});
    for (const Alloc& a : host_allocs)
        out->push_back(MemRange{reinterpret_cast<uintptr_t>(a.ptr), a.len, true, nullptr, nullptr});
}
}  // namespace emu

namespace {
// The device allocation or mapped pinned host allocation that holds all of [p, p + bytes) — what
// a copy, a memset or a GEMM on the device side must address (a GPU refuses or faults) — or null.
// Call with allocs_lock held.
const Alloc* holding(uintptr_t p, size_t bytes) {
    for (const std::vector<Alloc>* list : {&allocs, &host_allocs})
        for (const Alloc& a : *list) {
            const uintptr_t base = reinterpret_cast<uintptr_t>(a.ptr);
            if (p >= base && p - base <= a.len && bytes <= a.len - (p - base)) return &a;
        }
    return nullptr;
}

// Where [p, p + bytes) lies in one allocation: true, and (`mark`, check builds) its bytes marked
// written. Else false.
bool device_span(uintptr_t p, size_t bytes, bool mark) {
    std::lock_guard<std::mutex> hold(allocs_lock);
    const Alloc* a = holding(p, bytes);
    if (a != nullptr && mark && a->written != nullptr)
        emu::bits_set(a->written, p - reinterpret_cast<uintptr_t>(a->ptr), bytes);
    return a != nullptr;
}

// Refuses a copy or memset whose device side `d` is not within one allocation, as the driver
// does (CUDA_ERROR_INVALID_VALUE), saying which; a destination taken is marked written.
bool span_refused(const char* call, CUdeviceptr d, size_t n, bool destination) {
    if (n == 0 || device_span(d, n, destination)) return false;
    std::fprintf(stderr, "cuda-emu: %s: %s [0x%llx, +%zu B) is not within one device allocation\n", call,
                 destination ? "destination" : "source", d, n);
    return true;
}
}  // namespace

// For the emulator's cuBLAS (cublas.cpp): whether an operand lies in one allocation, and the C it
// wrote marked written.
extern "C" __attribute__((visibility("default"))) int djinn_emu_device_span(const void* p, size_t bytes) {
    return device_span(reinterpret_cast<uintptr_t>(p), bytes, false) ? 1 : 0;
}
extern "C" __attribute__((visibility("default"))) void djinn_emu_mark_written(const void* p, size_t bytes) {
    device_span(reinterpret_cast<uintptr_t>(p), bytes, true);
}

#define API extern "C" __attribute__((visibility("default"))) CUresult

API cuInit(unsigned) { return SUCCESS; }
API cuDriverGetVersion(int* v) {
    *v = 13000;
    return SUCCESS;
}
API cuDeviceGetCount(int* n) {
    *n = 1;
    return SUCCESS;
}
API cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal != 0) return INVALID_DEVICE;
    *d = 0;
    return SUCCESS;
}
API cuDeviceGetName(char* name, int len, CUdevice) {
    std::snprintf(name, (size_t)len, "djinn cuda-emu (CPU, not a GPU)");
    return SUCCESS;
}
API cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
    *bytes = memory_bytes();
    return SUCCESS;
}
API cuDeviceGetUuid(unsigned char* uuid, CUdevice) {
    std::memset(uuid, 0xe7, 16);
    return SUCCESS;
}
API cuDeviceGetUuid_v2(unsigned char* uuid, CUdevice d) { return cuDeviceGetUuid(uuid, d); }
API cuDeviceGetAttribute(int* v, int attr, CUdevice) {
    switch (attr) {
        case 1: *v = 1024; break;                      // max threads per block
        case 2: *v = 1024; break;                      // max block dim x
        case 3: *v = 1024; break;
        case 4: *v = 64; break;
        case 5: *v = 2147483647; break;                // max grid dim x
        case 6: *v = 65535; break;
        case 7: *v = 65535; break;
        case 8: *v = SMEM_DEFAULT; break;              // shared memory per block
        case 10: *v = 32; break;                       // warp size
        case 16: *v = SM_COUNT; break;                 // multiprocessors
        case 75: *v = 9; break;                        // compute capability
        case 76: *v = 0; break;
        case 81: *v = 228 * 1024; break;               // shared memory per SM
        case 97: *v = SMEM_OPTIN; break;               // opt-in shared memory per block
        case 115: *v = 0; break;                       // memory pools: no (cuMemAlloc only)
        default: *v = 0;
    }
    return SUCCESS;
}
API cuDevicePrimaryCtxRetain(Ctx** ctx, CUdevice) {
    *ctx = &primary;
    return SUCCESS;
}
API cuDevicePrimaryCtxRelease_v2(CUdevice) { return SUCCESS; }
API cuCtxSetCurrent(Ctx* ctx) {
    current_ctx = ctx;
    return SUCCESS;
}
API cuCtxGetCurrent(Ctx** ctx) {
    *ctx = current_ctx;
    return SUCCESS;
}
API cuCtxSynchronize() { return SUCCESS; }

API cuStreamCreate(void** s, unsigned) {
    *s = new int(0);
    return SUCCESS;
}
API cuStreamCreateWithPriority(void** s, unsigned f, int) { return cuStreamCreate(s, f); }
API cuStreamDestroy_v2(void* s) {
    delete static_cast<int*>(s);
    return SUCCESS;
}
API cuStreamSynchronize(void*) { return SUCCESS; }
API cuStreamQuery(void*) { return SUCCESS; }
API cuStreamWaitEvent(void*, void*, unsigned) { return SUCCESS; }

API cuEventCreate(void** e, unsigned) {
    *e = new int(0);
    return SUCCESS;
}
API cuEventDestroy_v2(void* e) {
    delete static_cast<int*>(e);
    return SUCCESS;
}
API cuEventRecord(void*, void*) { return SUCCESS; }
API cuEventQuery(void*) { return SUCCESS; }
API cuEventSynchronize(void*) { return SUCCESS; }
// Work completes inside the calls, so two events never have time between them.
API cuEventElapsedTime(float* ms, void*, void*) {
    *ms = 0.0f;
    return SUCCESS;
}
API cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }

API cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    *total = memory_bytes();
    const size_t used = allocated.load();
    *free_bytes = used < *total ? *total - used : 0;
    return SUCCESS;
}
API cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    if (bytes == 0) return INVALID_VALUE;
    if (allocated.fetch_add(bytes) + bytes > memory_bytes()) {
        allocated.fetch_sub(bytes);
        return OUT_OF_MEMORY;
    }
    void* m = host_alloc(bytes);
    if (!m) {
        allocated.fetch_sub(bytes);
        return OUT_OF_MEMORY;
    }
    std::memset(m, 0xff, bytes < POISON_LIMIT ? bytes : POISON_LIMIT);
    unsigned char* written = nullptr;
    uint64_t* stores = nullptr;
#ifdef DJINN_EMU_CHECK
    // Zero pages until touched: only what kernels store to costs memory.
    written = static_cast<unsigned char*>(host_alloc(bytes / 8 + 1));
    stores = static_cast<uint64_t*>(host_alloc(stores_bytes(bytes)));
    if (!written || !stores) {
        if (written) munmap(written, bytes / 8 + 1);
        if (stores) munmap(stores, stores_bytes(bytes));
        munmap(m, bytes);
        allocated.fetch_sub(bytes);
        return OUT_OF_MEMORY;
    }
#endif
    {
        std::lock_guard<std::mutex> hold(allocs_lock);
        allocs.push_back(Alloc{m, bytes, written, stores});
    }
    *p = reinterpret_cast<CUdeviceptr>(m);
    return SUCCESS;
}
API cuMemFree_v2(CUdeviceptr p) {
    std::lock_guard<std::mutex> hold(allocs_lock);
    for (size_t i = 0; i < allocs.size(); ++i) {
        if (reinterpret_cast<CUdeviceptr>(allocs[i].ptr) != p) continue;
        munmap(allocs[i].ptr, allocs[i].len);
        if (allocs[i].written) munmap(allocs[i].written, allocs[i].len / 8 + 1);
        if (allocs[i].stores) munmap(allocs[i].stores, stores_bytes(allocs[i].len));
        allocated.fetch_sub(allocs[i].len);
        allocs.erase(allocs.begin() + (long)i);
        return SUCCESS;
    }
    return INVALID_VALUE;
}
API cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    bytes = bytes ? bytes : 1;
    *p = host_alloc(bytes);
    if (!*p) return OUT_OF_MEMORY;
    std::lock_guard<std::mutex> hold(allocs_lock);
    host_allocs.push_back(Alloc{*p, bytes, nullptr, nullptr});
    return SUCCESS;
}
API cuMemFreeHost(void* p) {
    std::lock_guard<std::mutex> hold(allocs_lock);
    for (size_t i = 0; i < host_allocs.size(); ++i) {
        if (host_allocs[i].ptr != p) continue;
        munmap(p, host_allocs[i].len);
        host_allocs.erase(host_allocs.begin() + (long)i);
        return SUCCESS;
    }
    return INVALID_VALUE;
}
API cuMemHostGetDevicePointer_v2(CUdeviceptr* d, void* p, unsigned) {
    *d = reinterpret_cast<CUdeviceptr>(p);
    return SUCCESS;
}
API cuMemcpyHtoD_v2(CUdeviceptr d, const void* s, size_t n) {
    if (span_refused("cuMemcpyHtoD", d, n, true)) return INVALID_VALUE;
    std::memcpy(reinterpret_cast<void*>(d), s, n);
    return SUCCESS;
}
API cuMemcpyDtoH_v2(void* d, CUdeviceptr s, size_t n) {
    if (span_refused("cuMemcpyDtoH", s, n, false)) return INVALID_VALUE;
    std::memcpy(d, reinterpret_cast<const void*>(s), n);
    return SUCCESS;
}
API cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t n) {
    if (span_refused("cuMemcpyDtoD", s, n, false) || span_refused("cuMemcpyDtoD", d, n, true))
        return INVALID_VALUE;
    std::memmove(reinterpret_cast<void*>(d), reinterpret_cast<const void*>(s), n);
    return SUCCESS;
}
API cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* s, size_t n, void*) { return cuMemcpyHtoD_v2(d, s, n); }
API cuMemcpyDtoHAsync_v2(void* d, CUdeviceptr s, size_t n, void*) { return cuMemcpyDtoH_v2(d, s, n); }
API cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, void*) { return cuMemcpyDtoD_v2(d, s, n); }
API cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) {
    if (span_refused("cuMemsetD8", d, n, true)) return INVALID_VALUE;
    std::memset(reinterpret_cast<void*>(d), v, n);
    return SUCCESS;
}
API cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, void*) { return cuMemsetD8_v2(d, v, n); }
// GPUDirect export: there is no device memory to hand a NIC.
API cuMemGetHandleForAddressRange(void*, CUdeviceptr, size_t, int, unsigned long long) { return NOT_SUPPORTED; }

API cuModuleLoadData(Module** m, const void* image) {
    const auto* img = static_cast<const unsigned char*>(image);
    const size_t len = image_len(img);
    auto* module = new Module;
    size_t count = 0;
    const emu::Kernel* all = emu::kernels(&count);
    for (size_t i = 0; i < count; ++i)
        if (image_has(img, len, all[i].name)) module->functions.push_back(Function{&all[i]});
    if (module->functions.empty()) {
        delete module;
        return INVALID_IMAGE;
    }
    *m = module;
    return SUCCESS;
}
API cuModuleUnload(Module* m) {
    delete m;
    return SUCCESS;
}
API cuModuleGetFunction(Function** f, Module* m, const char* name) {
    for (Function& fn : m->functions) {
        if (std::strcmp(fn.kernel->name, name) == 0) {
            *f = &fn;
            return SUCCESS;
        }
    }
    return NOT_FOUND;
}
API cuFuncSetAttribute(Function* f, int attr, int value) {
    if (attr != 8) return SUCCESS;  // only the dynamic shared memory cap has an effect here
    if (value < 0 || value > SMEM_OPTIN) return INVALID_VALUE;
    f->max_dynamic_smem = value;
    return SUCCESS;
}
API cuFuncGetAttribute(int* v, int attr, Function* f) {
    *v = attr == 8 ? f->max_dynamic_smem : attr == 0 ? (int)f->kernel->max_threads : 0;
    return SUCCESS;
}
API cuLaunchKernel(Function* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned smem, void*, void** params, void** extra) {
    if (extra != nullptr || f == nullptr) return INVALID_VALUE;
    if (gy > 65535 || gz > 65535 || gx > 2147483647u || bx > 1024 || by > 1024 || bz > 64) return INVALID_VALUE;
    if ((int)smem > f->max_dynamic_smem) {
        std::fprintf(stderr, "cuda-emu: %s: %u B of dynamic shared memory over the function's %d B cap\n",
                     f->kernel->name, smem, f->max_dynamic_smem);
        return INVALID_VALUE;
    }
    std::string why;
    switch (emu::launch(*f->kernel, dim3e{gx, gy, gz}, dim3e{bx, by, bz}, smem, params, &why)) {
        case emu::Launch::Ok: return SUCCESS;
        case emu::Launch::Refused:
            std::fprintf(stderr, "cuda-emu: %s launch refused: %s\n", f->kernel->name, why.c_str());
            return (unsigned long long)bx * by * bz > f->kernel->max_threads ? LAUNCH_OUT_OF_RESOURCES : INVALID_VALUE;
        case emu::Launch::Hung:
            std::fprintf(stderr, "cuda-emu: %s launch failed: %s\n", f->kernel->name, why.c_str());
            return LAUNCH_FAILED;
        case emu::Launch::Illegal:
            std::fprintf(stderr, "cuda-emu check: %s: %s\n", f->kernel->name, why.c_str());
            return ILLEGAL_ADDRESS;
    }
    return LAUNCH_FAILED;
}

// Resident blocks per SM by H100 limits: 2048 threads, 32 blocks, 228 KiB of shared memory with
// 1 KiB reserved per block, and registers as the kernel's __launch_bounds__ minimum promises
// (the emulator has no register counts; where a kernel gives no minimum, registers don't bind).
API cuOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Function* f, int block_size, size_t smem) {
    if (!f || block_size <= 0 || block_size > 1024) return INVALID_VALUE;
    int n = std::min(32, 2048 / block_size);
    n = std::min(n, (int)((228 * 1024) / (smem + 1024)));
    if (f->kernel->min_blocks > 0) n = std::min(n, f->kernel->min_blocks);
    *blocks = n;
    return SUCCESS;
}
API cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* blocks, Function* f, int block_size, size_t smem,
                                                         unsigned) {
    return cuOccupancyMaxActiveBlocksPerMultiprocessor(blocks, f, block_size, smem);
}

// The driver's private export tables (NVRTC asks for one when it finds a libcuda): none here,
// so a process that compiles kernels with NVRTC while the emulator is on its path carries on.
API cuGetExportTable(const void** table, const void*) {
    *table = nullptr;
    return NOT_SUPPORTED;
}

API cuGetErrorName(CUresult r, const char** s) {
    *s = error_name(r);
    return SUCCESS;
}
API cuGetErrorString(CUresult r, const char** s) {
    *s = error_name(r);
    return SUCCESS;
}
