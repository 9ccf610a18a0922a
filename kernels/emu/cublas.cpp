// libcublas.so for the kernel emulator: cublasGemmEx and cublasGemmStridedBatchedEx over host
// memory (device pointers are host addresses, see driver.cpp), column-major as cuBLAS defines
// them, f32 accumulation. Arguments are checked as cuBLAS checks them — leading dimensions
// against the operand shapes, the (A/B, C, compute) type combinations cuBLAS supports — so a
// layout the host code gets wrong fails here as it would on a GPU. beta == 0 never reads C.
// Every operand's whole extent (leading dimensions and batch strides included) must lie within
// one device allocation, as the emulated driver knows them: a GPU's kernels would fault
// otherwise, so the call fails with CUBLAS_STATUS_EXECUTION_FAILED and says which operand.
#include <dlfcn.h>
#include <immintrin.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

namespace {

enum : int { OK = 0, NOT_INITIALIZED = 1, INVALID_VALUE = 7, EXECUTION_FAILED = 13, NOT_SUPPORTED = 15 };
enum : int { R_32F = 0, R_16F = 2, R_16BF = 14 };
enum : int { COMPUTE_32F = 68 };

struct Handle {
    void* stream = nullptr;
};

float load(const void* p, int ty, int64_t i) {
    switch (ty) {
        case R_32F: return static_cast<const float*>(p)[i];
        case R_16F: return _cvtsh_ss(static_cast<const uint16_t*>(p)[i]);
        default: {
            const uint32_t u = (uint32_t)static_cast<const uint16_t*>(p)[i] << 16;
            float f;
            std::memcpy(&f, &u, 4);
            return f;
        }
    }
}

void store(void* p, int ty, int64_t i, float v) {
    switch (ty) {
        case R_32F: static_cast<float*>(p)[i] = v; break;
        case R_16F: static_cast<uint16_t*>(p)[i] = (uint16_t)_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT); break;
        default: {
            uint32_t u;
            std::memcpy(&u, &v, 4);
            const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
            static_cast<uint16_t*>(p)[i] = nan ? (uint16_t)((u >> 16) | 0x40) : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        }
    }
}

bool known(int ty) { return ty == R_32F || ty == R_16F || ty == R_16BF; }

// The emulated driver (driver.cpp), when the libcuda.so.1 loaded is ours: its allocation check,
// and (check builds) its record of the bytes written.
struct Driver {
    int (*span)(const void*, size_t) = nullptr;
    void (*mark_written)(const void*, size_t) = nullptr;
};
const Driver& driver() {
    static const Driver d = [] {
        Driver d;
        if (void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD)) {
            d.span = reinterpret_cast<int (*)(const void*, size_t)>(dlsym(lib, "djinn_emu_device_span"));
            d.mark_written = reinterpret_cast<void (*)(const void*, size_t)>(dlsym(lib, "djinn_emu_mark_written"));
        }
        return d;
    }();
    return d;
}

// The bytes the `rows` x `cols` column-major operand spans (leading dimension `ld`, `batch` of
// them `stride` elements apart).
size_t extent(int ty, int rows, int cols, int ld, int64_t stride, int batch) {
    if (rows == 0 || cols == 0 || batch == 0) return 0;
    const int64_t last = (int64_t)(batch - 1) * (stride > 0 ? stride : 0) + (int64_t)(cols - 1) * ld + (rows - 1);
    return (size_t)(last + 1) * (ty == R_32F ? 4 : 2);
}

// Whether the operand's extent lies in one device allocation; says which operand where not.
bool operand_ok(const char* name, const void* p, size_t bytes) {
    if (bytes == 0 || driver().span == nullptr || driver().span(p, bytes) != 0) return true;
    std::fprintf(stderr, "cuda-emu cublas: %s reaches %zu B from %p, past its device allocation\n", name, bytes, p);
    return false;
}

// C = alpha · op(A) · op(B) + beta · C for `batch` matrices at the given element strides.
int gemm(int ta, int tb, int m, int n, int k, const float* alpha, const void* a, int at, int lda, int64_t sa,
         const void* b, int bt, int ldb, int64_t sb, const float* beta, void* c, int ct, int ldc, int64_t sc,
         int batch, int compute) {
    if (compute != COMPUTE_32F) return NOT_SUPPORTED;
    if (!known(at) || !known(bt) || !known(ct) || at != bt || (ct != at && ct != R_32F)) return NOT_SUPPORTED;
    if (ta < 0 || ta > 2 || tb < 0 || tb > 2) return INVALID_VALUE;
    if (m < 0 || n < 0 || k < 0 || batch < 0) return INVALID_VALUE;
    const int a_rows = ta == 0 ? m : k, b_rows = tb == 0 ? k : n;
    if (lda < (a_rows > 1 ? a_rows : 1) || ldb < (b_rows > 1 ? b_rows : 1) || ldc < (m > 1 ? m : 1)) return INVALID_VALUE;
    if (m == 0 || n == 0 || batch == 0) return OK;
    const size_t c_bytes = extent(ct, m, n, ldc, sc, batch);
    if (!operand_ok("A", a, extent(at, a_rows, ta == 0 ? k : m, lda, sa, batch)) ||
        !operand_ok("B", b, extent(bt, b_rows, tb == 0 ? n : k, ldb, sb, batch)) || !operand_ok("C", c, c_bytes))
        return EXECUTION_FAILED;
    std::vector<float> ar((size_t)m * k), br((size_t)n * k);
    for (int p = 0; p < batch; ++p) {
        // op(A) as m rows of k, op(B)ᵀ as n rows of k: every dot product reads contiguously.
        for (int i = 0; i < m; ++i)
            for (int l = 0; l < k; ++l)
                ar[(size_t)i * k + l] = load(a, at, p * sa + (ta == 0 ? i + (int64_t)l * lda : l + (int64_t)i * lda));
        for (int j = 0; j < n; ++j)
            for (int l = 0; l < k; ++l)
                br[(size_t)j * k + l] = load(b, bt, p * sb + (tb == 0 ? l + (int64_t)j * ldb : j + (int64_t)l * ldb));
        for (int j = 0; j < n; ++j)
            for (int i = 0; i < m; ++i) {
                const float* x = &ar[(size_t)i * k];
                const float* y = &br[(size_t)j * k];
                // Eight partial sums (vectorisable), as a GPU's blocked reduction also reorders.
                float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                int l = 0;
                for (; l + 8 <= k; l += 8)
                    for (int u = 0; u < 8; ++u) part[u] += x[l + u] * y[l + u];
                float acc = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
                for (; l < k; ++l) acc += x[l] * y[l];
                const int64_t ci = p * sc + i + (int64_t)j * ldc;
                const float prior = *beta == 0.0f ? 0.0f : *beta * load(c, ct, ci);
                store(c, ct, ci, *alpha * acc + prior);
            }
    }
    if (driver().mark_written) driver().mark_written(c, c_bytes);
    return OK;
}

}  // namespace

#define API extern "C" __attribute__((visibility("default"))) int

API cublasCreate_v2(Handle** h) {
    *h = new Handle;
    return OK;
}
API cublasDestroy_v2(Handle* h) {
    if (!h) return NOT_INITIALIZED;
    delete h;
    return OK;
}
API cublasSetStream_v2(Handle* h, void* s) {
    if (!h) return NOT_INITIALIZED;
    h->stream = s;
    return OK;
}
API cublasGetVersion_v2(Handle*, int* v) {
    *v = 130000;
    return OK;
}
API cublasGemmEx(Handle* h, int ta, int tb, int m, int n, int k, const float* alpha, const void* a, int at, int lda,
                 const void* b, int bt, int ldb, const float* beta, void* c, int ct, int ldc, int compute, int) {
    if (!h) return NOT_INITIALIZED;
    return gemm(ta, tb, m, n, k, alpha, a, at, lda, 0, b, bt, ldb, 0, beta, c, ct, ldc, 0, 1, compute);
}
API cublasGemmStridedBatchedEx(Handle* h, int ta, int tb, int m, int n, int k, const float* alpha, const void* a,
                               int at, int lda, long long sa, const void* b, int bt, int ldb, long long sb,
                               const float* beta, void* c, int ct, int ldc, long long sc, int batch, int compute, int) {
    if (!h) return NOT_INITIALIZED;
    return gemm(ta, tb, m, n, k, alpha, a, at, lda, sa, b, bt, ldb, sb, beta, c, ct, ldc, sc, batch, compute);
}
