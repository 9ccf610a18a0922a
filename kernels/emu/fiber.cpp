// Runs one kernel launch on the CPU: each thread block in turn, each CUDA thread a fiber with
// its own stack, switched by hand (x86-64 SysV; a switch costs a few nanoseconds, which matters:
// a decode block parks its 128 threads at every warp shuffle).
//
// Invariants: one launch at a time in the process (the launch lock: the shared-memory arenas and
// the fiber pool are global); every fiber of a block runs on the launching OS thread; a parked
// fiber resumes only when its barrier is complete — every live thread of the block for
// `__syncthreads`, every live lane of its warp, at the same shuffle count, for a shuffle.
//
// Built with DJINN_EMU_CHECK (scripts/cuda-emu --check), the scheduler also tells check.cpp
// which thread runs and where each barrier interval begins, and a thread whose access the check
// refuses (`fail_thread`) is never resumed: its block, and the launch, fail.
#include "runtime.h"

#include <sys/mman.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

// void emu_switch(void** save_sp, void* load_sp): saves the callee-saved registers, MXCSR and
// the x87 control word on the current stack, stores its pointer in *save_sp, and resumes the
// stack at load_sp (which was saved the same way, or built by `prime`).
asm(R"(
    .text
    .globl emu_switch
    .hidden emu_switch
    .type emu_switch,@function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");
extern "C" void emu_switch(void** save_sp, void* load_sp);

namespace emu {

dim3e block_idx, block_dim, grid_dim;

namespace {

constexpr size_t STACK_BYTES = 128 << 10;
constexpr size_t GUARD_BYTES = 4096;
constexpr unsigned MAX_THREADS = 1024;

enum class State { Ready, AtBlock, AtWarp, Done, Failed };

struct Fiber {
    void* sp = nullptr;
    char* stack = nullptr;  // lowest usable byte (a guard page lies below)
    dim3e tid{};
    unsigned lin = 0;
    unsigned shuffles = 0;  // shuffles taken: lanes of a warp must agree at each one
    State state = State::Done;
};

std::mutex launch_lock;
std::vector<Fiber> pool;
void* scheduler_sp = nullptr;
Fiber* current = nullptr;
void (*body)(void**) = nullptr;
void** body_params = nullptr;
void* smem = nullptr;
// Static shared memory (`SHARED`/`SHARED_ARRAY` in common.cuh): each declaration's range of one
// arena, reserved when a thread first reaches it.
alignas(64) unsigned char static_arena[STATIC_SMEM_BYTES];
size_t static_reserved = 0;
std::string failure;  // why the running block failed (fail_thread), or empty
// Shuffle exchange: [warp][shuffle parity][lane]. Two buffers, because a fast lane may write
// its next shuffle's value before a slow lane has read this one's.
uint64_t exchange[MAX_THREADS / 32][2][32];

[[noreturn]] void fiber_main() {
    body(body_params);
    current->state = State::Done;
    emu_switch(&current->sp, scheduler_sp);
    std::abort();  // a finished fiber is never resumed
}

void ensure_pool() {
    if (!pool.empty()) return;
    const size_t each = STACK_BYTES + GUARD_BYTES;
    void* base = mmap(nullptr, each * MAX_THREADS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                      -1, 0);
    if (base == MAP_FAILED) {
        std::perror("cuda-emu: fiber stacks");
        std::abort();
    }
    pool.resize(MAX_THREADS);
    for (unsigned i = 0; i < MAX_THREADS; ++i) {
        char* lo = static_cast<char*>(base) + i * each;
        mprotect(lo, GUARD_BYTES, PROT_NONE);  // a stack overflow faults instead of corrupting a neighbour
        pool[i].stack = lo + GUARD_BYTES;
    }
}

// Builds the frame emu_switch pops: MXCSR/FCW, six registers, then `ret` into fiber_main with
// the stack aligned as at a call (rsp % 16 == 8 on entry).
void prime(Fiber& f) {
    auto* s = reinterpret_cast<uint64_t*>(f.stack + STACK_BYTES);
    *--s = 0;  // fiber_main's (never used) return address
    *--s = reinterpret_cast<uint64_t>(&fiber_main);
    for (int i = 0; i < 6; ++i) *--s = 0;
    *--s = (uint64_t{0x037f} << 32) | 0x1f80;  // default FCW, MXCSR (round to nearest, no FTZ)
    f.sp = s;
}

void switch_to(Fiber& f) {
    current = &f;
#ifdef DJINN_EMU_CHECK
    check::running(f.lin, f.stack);
#endif
    emu_switch(&scheduler_sp, f.sp);
}

void park(State s) {
    current->state = s;
    emu_switch(&current->sp, scheduler_sp);
}

// Runs every thread of the current block to completion; false (with `why`) on a barrier that
// can never complete.
bool run_block(unsigned n, std::string* why) {
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = pool[i];
        f.lin = i;
        f.tid = dim3e{i % block_dim.x, (i / block_dim.x) % block_dim.y, i / (block_dim.x * block_dim.y)};
        f.shuffles = 0;
        f.state = State::Ready;
        prime(f);
    }
    // Shared memory starts undefined in every block: NaN bytes, so reads before writes show.
    std::memset(static_arena, 0xff, static_reserved);
#ifdef DJINN_EMU_CHECK
    check::block_begins();
#endif
    // DJINN_CUDA_EMU_ORDER=reverse runs each barrier interval's threads last to first: a kernel
    // whose result depends on that order has a race a GPU may or may not show.
    static const bool reverse = [] {
        const char* v = std::getenv("DJINN_CUDA_EMU_ORDER");
        return v != nullptr && std::string(v) == "reverse";
    }();
    for (;;) {
        for (unsigned j = 0; j < n; ++j) {
            const unsigned i = reverse ? n - 1 - j : j;
            if (pool[i].state != State::Ready) continue;
            switch_to(pool[i]);
            if (!failure.empty()) {
                current = nullptr;
                *why = failure;
                return false;
            }
        }
        current = nullptr;
        unsigned done = 0, at_block = 0;
        for (unsigned i = 0; i < n; ++i) {
            done += pool[i].state == State::Done;
            at_block += pool[i].state == State::AtBlock;
        }
        if (done == n) return true;
        if (at_block + done == n) {
            for (unsigned i = 0; i < n; ++i)
                if (pool[i].state == State::AtBlock) pool[i].state = State::Ready;
#ifdef DJINN_EMU_CHECK
            check::block_synced();
#endif
            continue;
        }
        bool released = false;
        for (unsigned w = 0; w * 32 < n; ++w) {
            const unsigned lo = w * 32, hi = std::min(n, lo + 32);
            unsigned waiting = 0, exited = 0, other = 0;
            for (unsigned i = lo; i < hi; ++i) {
                waiting += pool[i].state == State::AtWarp;
                exited += pool[i].state == State::Done;
                other += pool[i].state == State::AtBlock;
            }
            if (waiting == 0) continue;
            char buf[160];
            if (other != 0 || exited != 0) {
                std::snprintf(buf, sizeof buf,
                              "warp %u: %u lanes at a shuffle, %u at __syncthreads, %u exited (a full-mask shuffle "
                              "needs every lane)",
                              w, waiting, other, exited);
                *why = buf;
                return false;
            }
            for (unsigned i = lo + 1; i < hi; ++i) {
                if (pool[i].shuffles != pool[lo].shuffles) {
                    std::snprintf(buf, sizeof buf, "warp %u: lanes at different shuffles (lane %u at %u, lane %u at %u)",
                                  w, lo, pool[lo].shuffles, i, pool[i].shuffles);
                    *why = buf;
                    return false;
                }
            }
            for (unsigned i = lo; i < hi; ++i) pool[i].state = State::Ready;
            released = true;
        }
        if (!released) {
            *why = "no barrier can complete";
            return false;
        }
    }
}

}  // namespace

dim3e thread_idx() { return current->tid; }

void* dynamic_smem() { return smem; }

unsigned char* static_smem() { return static_arena; }

size_t reserve_static_smem(size_t bytes, size_t align, const char* name) {
    const size_t at = (static_reserved + align - 1) / align * align;
    if (at + bytes > STATIC_SMEM_BYTES) {
        std::fprintf(stderr, "cuda-emu: static shared memory `%s` (%zu B) past the emulator's %zu B\n", name, bytes,
                     STATIC_SMEM_BYTES);
        std::abort();
    }
    std::memset(static_arena + at, 0xff, bytes);
    static_reserved = at + bytes;
#ifdef DJINN_EMU_CHECK
    check::static_smem_reserved(static_arena + at, bytes, name);
#endif
    return at;
}

void fail_thread(std::string why) {
    if (failure.empty()) {
        char where[96];
        const dim3e t = current->tid;
        std::snprintf(where, sizeof where, "thread (%u,%u,%u): ", t.x, t.y, t.z);
        failure = where + why;
    }
    park(State::Failed);
    std::abort();  // a failed fiber is never resumed
}

void sync_block() { park(State::AtBlock); }

uint64_t shuffle(uint64_t bits, int src) {
    Fiber* f = current;
    const unsigned warp = f->lin / 32, lane = f->lin % 32, parity = f->shuffles & 1;
    exchange[warp][parity][lane] = bits;
    ++f->shuffles;
    park(State::AtWarp);
    const unsigned s = (unsigned)src;
    // A lane past the block's last thread does not exist: its value is undefined on a GPU.
    if (warp * 32 + s >= block_dim.x * block_dim.y * block_dim.z) return bits;
    return exchange[warp][parity][s];
}

// The end of a launch, whatever its outcome.
static void finish() {
    smem = nullptr;
#ifdef DJINN_EMU_CHECK
    check::launch_ends();
#endif
}

Launch launch(const Kernel& k, dim3e grid, dim3e block, size_t smem_bytes, void** params, std::string* why) {
    const unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
    if (threads == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
        *why = "empty grid or block";
        return Launch::Refused;
    }
    if (threads > k.max_threads) {
        *why = "block of " + std::to_string(threads) + " threads exceeds the kernel's bound of " +
               std::to_string(k.max_threads);
        return Launch::Refused;
    }
    std::lock_guard<std::mutex> hold(launch_lock);
    ensure_pool();
    // Shared memory starts undefined on a GPU: fill it with NaN bytes so reads before writes show.
    std::vector<unsigned char> dyn(smem_bytes, 0xff);
    smem = dyn.empty() ? nullptr : dyn.data();
    body = k.call;
    body_params = params;
    grid_dim = grid;
    block_dim = block;
    failure.clear();
#ifdef DJINN_EMU_CHECK
    check::launch_begins(k, dyn.data(), dyn.size(), pool[0].stack - GUARD_BYTES,
                         pool[MAX_THREADS - 1].stack + STACK_BYTES,
                         STACK_BYTES + GUARD_BYTES, STACK_BYTES);
#endif
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                block_idx = dim3e{x, y, z};
                std::string err;
                if (!run_block((unsigned)threads, &err)) {
                    *why = std::string(k.name) + " block (" + std::to_string(x) + "," + std::to_string(y) + "," +
                           std::to_string(z) + "): " + err;
                    finish();
                    return failure.empty() ? Launch::Hung : Launch::Illegal;
                }
            }
    finish();
    return Launch::Ok;
}

}  // namespace emu
