// The emulator's memory and race check (scripts/cuda-emu --check), compute-sanitizer's memcheck
// and racecheck for the host-compiled kernels. kernels.cpp is compiled with GCC's
// -fsanitize=thread instrumentation, and its callbacks (__tsan_read4, __tsan_write16, ...) are
// defined here instead of by the ThreadSanitizer runtime: every load and store a kernel makes
// comes here first, on the fiber (CUDA thread) that makes it, before it happens.
//
// Memory: an access must lie wholly in the thread's own stack (its local memory), the block's
// shared memory (the static declarations reserved so far, the launch's dynamic bytes), a device
// allocation or mapped pinned host memory, or this library's own image (the block index and
// dimensions, constants). Anything else — past an allocation's end, another thread's stack,
// freed memory — is what a GPU reports as an illegal address: the thread ends before the access,
// and the launch returns CUDA_ERROR_ILLEGAL_ADDRESS with what was reached and where.
//
// Uninitialized reads, in device memory: a read of a byte no copy, memset, GEMM or kernel has
// written since the allocation (the driver keeps a bit per byte in check builds). A GPU's new
// memory holds whatever was there before; the plain build's NaN fill catches only what shows in a
// result. Data moves (Kernel::moves_data) may load such bytes; what they store from them stays
// unwritten.
//
// Races in device memory, within a launch: see `global` below.
//
// Races, in shared memory: for each byte, its last writer and its readers, and the barrier
// interval (from the block's start or its last completed __syncthreads) they acted in. Two
// threads in one interval, one of them writing, is a hazard a GPU may show or not. Warp shuffles
// do not order memory (only __syncthreads and __syncwarp do, and the kernels use no
// __syncwarp), so lanes of one warp count too. A read of a byte no thread of the block has
// written is refused as well: shared memory starts undefined in every block.
//
// Atomics (atomicOr on the error word) are checked for bounds, then performed; they are not
// races with one another.
#include <link.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "runtime.h"

namespace emu::check {
namespace {

constexpr uint16_t MANY = 0xffff;  // readers: more than one thread

struct Cell {
    uint64_t w_at = 0;  // interval of the last write (0: never)
    uint64_t r_at = 0;  // interval of the readers below
    uint16_t w_tid = 0;
    uint16_t r_tid = 0;  // the one reader, or MANY
};

struct Decl {
    uintptr_t lo, hi;
    const char* name;
};

bool active = false;  // a launch is running: instrumented code outside one (a test's host code) is not checked
std::vector<MemRange> memory;  // sorted by lo
size_t last_hit = 0;
uintptr_t dyn_lo = 0, dyn_hi = 0;
std::vector<Cell> dyn_cells;
uintptr_t arena_lo = 0, arena_hi = 0, arena_cap = 0;  // reserved: [arena_lo, arena_hi)
std::vector<Cell> arena_cells;
std::vector<Decl> decls;
uintptr_t stacks_lo = 0, stacks_hi = 0, slot_bytes = 1, stack_bytes = 0;
uintptr_t my_stack = 0;  // the running thread's lowest stack byte
unsigned tid = 0;
// Barrier intervals, numbered across launches: each block's start and each completed
// __syncthreads begins one. Never wraps (64 bits).
uint64_t interval = 1, block_first = 1, launch_first = 1;
std::vector<unsigned char> stored;  // per `memory` entry: a kernel stored to it in this launch
bool moves_data = false;            // the launch's kernel is a data move (Kernel::moves_data)
unsigned char loaded_unwritten[1024];  // data moves, per thread: its last load read unwritten bytes
std::vector<std::pair<uintptr_t, uintptr_t>> image;  // this library's loaded segments

bool within(uintptr_t a, size_t n, uintptr_t lo, uintptr_t hi) { return a >= lo && a < hi && n <= hi - a; }

int add_segments(dl_phdr_info* info, size_t, void*) {
    const uintptr_t me = reinterpret_cast<uintptr_t>(&interval);
    std::vector<std::pair<uintptr_t, uintptr_t>> segs;
    bool mine = false;
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        if (ph.p_type != PT_LOAD) continue;
        const uintptr_t lo = info->dlpi_addr + ph.p_vaddr, hi = lo + ph.p_memsz;
        segs.emplace_back(lo, hi);
        mine |= me >= lo && me < hi;
    }
    if (!mine) return 0;
    image = segs;
    return 1;
}

std::string hex(uintptr_t a) {
    char b[24];
    std::snprintf(b, sizeof b, "0x%" PRIxPTR, a);
    return b;
}

// Where a refused access went, against the nearest range a kernel may address.
std::string describe(uintptr_t a, size_t n, bool write) {
    std::string s = std::string(write ? "writes " : "reads ") + std::to_string(n) + " B at " + hex(a);
    if (a >= stacks_lo && a < stacks_hi) {
        const uintptr_t owner = (a - stacks_lo) / slot_bytes;
        return s + ", in thread " + std::to_string(owner) + "'s stack (local memory is private to its thread)";
    }
    if (a >= arena_lo && a < arena_lo + arena_cap)
        return s + ", in static shared memory outside every declaration reached so far";
    if (dyn_hi > dyn_lo && a >= dyn_lo && a < dyn_hi + (256 << 10))
        return s + ", " + std::to_string(a - dyn_lo) + " B into the launch's " + std::to_string(dyn_hi - dyn_lo) +
               " B of dynamic shared memory";
    const MemRange* best = nullptr;
    uintptr_t best_gap = UINTPTR_MAX;
    for (const MemRange& m : memory) {
        const uintptr_t gap = a >= m.lo ? a - m.lo - std::min<uintptr_t>(a - m.lo, m.bytes) : m.lo - a;
        if (gap < best_gap) best_gap = gap, best = &m;
    }
    if (best == nullptr) return s + ": no device memory is allocated";
    const char* what = best->pinned_host ? "mapped host allocation" : "device allocation";
    const std::string of = " the " + std::to_string(best->bytes) + " B " + what + " at " + hex(best->lo);
    if (a < best->lo) return s + ", " + std::to_string(best->lo - a) + " B before" + of;
    return s + ", " + std::to_string(a + n - best->lo - best->bytes) + " B past the end of" + of;
}

[[noreturn]] void refuse(uintptr_t a, size_t n, bool write) {
    fail_thread("illegal address: " + describe(a, n, write));
}

std::string shared_name(uintptr_t a) {
    if (a >= dyn_lo && a < dyn_hi) return "dynamic shared memory +" + std::to_string(a - dyn_lo);
    for (const Decl& d : decls)
        if (a >= d.lo && a < d.hi) return std::string("`") + d.name + "` +" + std::to_string(a - d.lo);
    return "static shared memory +" + std::to_string(a - arena_lo);
}

[[noreturn]] void race(uintptr_t a, bool write, const char* other_did, uint16_t other) {
    const std::string who = other == MANY ? "other threads" : "thread " + std::to_string(other);
    fail_thread(std::string("shared-memory race: ") + (write ? "writes " : "reads ") + shared_name(a) + ", which " +
                who + " " + other_did + " since the last __syncthreads");
}

void shared(Cell* c, uintptr_t a, size_t n, bool write) {
    const uint16_t me = (uint16_t)tid;
    for (size_t i = 0; i < n; ++i) {
        Cell& x = c[i];
        if (write) {
            if (x.w_at == interval && x.w_tid != me) race(a + i, true, "wrote", x.w_tid);
            if (x.r_at == interval && x.r_tid != me) race(a + i, true, "read", x.r_tid);
            x.w_at = interval;
            x.w_tid = me;
        } else {
            if (x.w_at < block_first)
                fail_thread("reads " + shared_name(a + i) +
                            " before any thread of this block wrote it (shared memory starts undefined)");
            if (x.w_at == interval && x.w_tid != me) race(a + i, false, "wrote", x.w_tid);
            if (x.r_at != interval) {
                x.r_at = interval;
                x.r_tid = me;
            } else if (x.r_tid != me) {
                x.r_tid = MANY;
            }
        }
    }
}

// Device memory within one launch: a store to a byte another thread stored to in this launch —
// from another block (blocks are unordered), or from this block since the last __syncthreads —
// and a load of such a byte. Stores are recorded per 4-byte granule (`MemRange::stores`: the
// barrier interval, the thread and which of the 4 bytes, so two threads' stores to neighbouring
// f16 elements are no race); a granule keeps only its last storing thread, so a race with an
// earlier one on other bytes can go unseen, never a false one. Loads are not recorded: a load
// followed by another thread's store (write-after-read) goes unseen.
void global(const MemRange& m, size_t idx, uintptr_t a, size_t n, bool write) {
    if (m.stores == nullptr || (!write && !stored[idx])) return;
    const uintptr_t off = a - m.lo;
    for (uintptr_t g = off / 4; g * 4 < off + n; ++g) {
        const uintptr_t lo = std::max<uintptr_t>(g * 4, off), hi = std::min<uintptr_t>(g * 4 + 4, off + n);
        const uint64_t mask = ((1u << (hi - lo)) - 1) << (lo - g * 4);
        const uint64_t r = m.stores[g];
        const uint64_t at = r >> 14;
        const unsigned who = (unsigned)(r >> 4) & 0x3ff;
        const bool mine = at == interval && who == tid;
        if ((r & mask) != 0 && at >= launch_first && (at < block_first || (at == interval && who != tid)))
            fail_thread(std::string("global-memory race: ") + (write ? "writes" : "reads") + " offset " +
                        std::to_string(lo) + " of the " + std::to_string(m.bytes) + " B device allocation at " +
                        hex(m.lo) + ", which thread " + std::to_string(who) +
                        (at < block_first ? " of another block of this launch wrote (blocks are unordered)"
                                          : " wrote since the last __syncthreads"));
        if (write) m.stores[g] = (interval << 14) | ((uint64_t)tid << 4) | (mine ? (r & 0xf) | mask : mask);
    }
    if (write) stored[idx] = 1;
}

// `track`: plain accesses; atomics are checked for bounds only (and mark what they write).
inline void access(uintptr_t a, size_t n, bool write, bool track = true) {
    if (!active) return;
    if (a - my_stack < stack_bytes && n <= stack_bytes - (a - my_stack)) return;
    if (within(a, n, dyn_lo, dyn_hi)) {
        if (track) shared(&dyn_cells[a - dyn_lo], a, n, write);
        return;
    }
    if (within(a, n, arena_lo, arena_hi)) {
        if (track) shared(&arena_cells[a - arena_lo], a, n, write);
        return;
    }
    const MemRange* m = nullptr;
    if (last_hit < memory.size() && within(a, n, memory[last_hit].lo, memory[last_hit].lo + memory[last_hit].bytes)) {
        m = &memory[last_hit];
    } else {
        // The last range starting at or below a.
        auto it =
            std::upper_bound(memory.begin(), memory.end(), a, [](uintptr_t v, const MemRange& r) { return v < r.lo; });
        if (it != memory.begin() && within(a, n, (it - 1)->lo, (it - 1)->lo + (it - 1)->bytes)) {
            last_hit = (size_t)(it - 1 - memory.begin());
            m = &memory[last_hit];
        }
    }
    if (m != nullptr) {
        if (m->written == nullptr) {  // mapped host memory: not tracked
            if (write) loaded_unwritten[tid] = 0;
            return;
        }
        if (track && !write && !bits_all(m->written, a - m->lo, n)) {
            if (!moves_data)
                fail_thread("uninitialized read: reads " + std::to_string(n) + " B at offset " +
                            std::to_string(a - m->lo) + " of the " + std::to_string(m->bytes) +
                            " B device allocation at " + hex(m->lo) +
                            ", which no copy, memset, GEMM or kernel has written");
            loaded_unwritten[tid] = 1;
        }
        if (track) global(*m, (size_t)(m - memory.data()), a, n, write);
        if (write) {
            // A data move's store of an unwritten load moves no data: the destination stays
            // unwritten. (Each store pairs with the thread's last load; a pair misread errs
            // toward written, so no later read is refused wrongly.)
            if (moves_data && loaded_unwritten[tid])
                bits_clear(m->written, a - m->lo, n);
            else
                bits_set(m->written, a - m->lo, n);
            loaded_unwritten[tid] = 0;
        }
        return;
    }
    if (a >= arena_lo && a < arena_lo + arena_cap) refuse(a, n, write);  // in the image, but no declaration's
    if (!(a >= stacks_lo && a < stacks_hi))
        for (const auto& seg : image)
            if (within(a, n, seg.first, seg.second)) return;
    refuse(a, n, write);
}

}  // namespace

void launch_begins(const Kernel& k, void* dyn, size_t dyn_bytes, char* lo, char* hi, size_t slot, size_t each) {
    active = true;
    moves_data = k.moves_data;
    memory_ranges(&memory);
    std::sort(memory.begin(), memory.end(), [](const MemRange& x, const MemRange& y) { return x.lo < y.lo; });
    last_hit = 0;
    stored.assign(memory.size(), 0);
    launch_first = interval + 1;
    dyn_lo = reinterpret_cast<uintptr_t>(dyn);
    dyn_hi = dyn_lo + dyn_bytes;
    dyn_cells.assign(dyn_bytes, Cell{});
    stacks_lo = reinterpret_cast<uintptr_t>(lo);
    stacks_hi = reinterpret_cast<uintptr_t>(hi);
    slot_bytes = slot;
    stack_bytes = each;
    if (image.empty()) dl_iterate_phdr(add_segments, nullptr);
}

void launch_ends() { active = false; }

void block_begins() {
    block_first = ++interval;
    std::memset(loaded_unwritten, 0, sizeof loaded_unwritten);
}

void block_synced() { ++interval; }

void running(unsigned thread, char* stack_lo) {
    tid = thread;
    my_stack = reinterpret_cast<uintptr_t>(stack_lo);
}

void static_smem_reserved(unsigned char* at, size_t bytes, const char* name) {
    if (arena_cap == 0) {
        arena_lo = reinterpret_cast<uintptr_t>(static_smem());
        arena_hi = arena_lo;
        arena_cap = STATIC_SMEM_BYTES;
        arena_cells.assign(arena_cap, Cell{});
    }
    const uintptr_t lo = reinterpret_cast<uintptr_t>(at);
    decls.push_back(Decl{lo, lo + bytes, name});
    arena_hi = std::max(arena_hi, lo + bytes);
}

}  // namespace emu::check

// The instrumentation's entry points (GCC -fsanitize=thread, its ABI: the ThreadSanitizer
// runtime's). Function entry and exit are not instrumented (--param
// tsan-instrument-func-entry-exit=0); __tsan_init is the module constructor's call.
using emu::check::access;
#define DJINN_TSAN_ACCESS(N)                                                                          \
    extern "C" void __tsan_read##N(void* p) { access(reinterpret_cast<uintptr_t>(p), N, false); }    \
    extern "C" void __tsan_write##N(void* p) { access(reinterpret_cast<uintptr_t>(p), N, true); }    \
    extern "C" void __tsan_unaligned_read##N(void* p) { access(reinterpret_cast<uintptr_t>(p), N, false); } \
    extern "C" void __tsan_unaligned_write##N(void* p) { access(reinterpret_cast<uintptr_t>(p), N, true); }
DJINN_TSAN_ACCESS(1)
DJINN_TSAN_ACCESS(2)
DJINN_TSAN_ACCESS(4)
DJINN_TSAN_ACCESS(8)
DJINN_TSAN_ACCESS(16)
extern "C" void __tsan_read_range(void* p, unsigned long n) { access(reinterpret_cast<uintptr_t>(p), n, false); }
extern "C" void __tsan_write_range(void* p, unsigned long n) { access(reinterpret_cast<uintptr_t>(p), n, true); }
extern "C" void __tsan_init() {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}

// Atomics: bounds as a write, then the operation itself (sequentially consistent, whatever
// order the kernel asked: one fiber runs at a time).
extern "C" uint8_t __tsan_atomic8_load(const volatile uint8_t* p, int) {
    access(reinterpret_cast<uintptr_t>(p), 1, false, false);
    return __atomic_load_n(p, __ATOMIC_SEQ_CST);
}
extern "C" void __tsan_atomic8_store(volatile uint8_t* p, uint8_t v, int) {
    access(reinterpret_cast<uintptr_t>(p), 1, true, false);
    __atomic_store_n(p, v, __ATOMIC_SEQ_CST);
}
extern "C" uint32_t __tsan_atomic32_fetch_or(volatile uint32_t* p, uint32_t v, int) {
    access(reinterpret_cast<uintptr_t>(p), 4, true, false);
    return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST);
}
