//! VMU benchmarks (harness = false: percentiles need an HDR histogram). Every figure is printed
//! next to a baseline measured in the same run, with the ratio.
//!
//! 1. alloc+free latency, p50/p99, one pair timed at a time, over a pre-fragmented heap:
//!    - the persistent-region TLSF [`OffsetAllocator`] vs the system allocator (`malloc`/`free`)
//!      on the same size sequence, and vs the backend's own reservation (`reserve` + drop: mmap
//!      on the CPU backend, cuMemAlloc/cuMemFree on CUDA);
//!    - a KV block through the session API (`open_session` + `append` of one block + `close`).
//!
//!    Target: p99 ≤ 0.25 µs.
//! 2. swap-out and swap-in of one session holding 1 MiB … 256 MiB of KV (1 GiB with
//!    `DJINN_VMU_BENCH_1GIB=1`; exactly `N` MiB with `DJINN_VMU_BENCH_SWAP_MIB=N`, e.g. 1280 for
//!    the GPU check's 1.3 GB): bandwidth and latency vs a raw copy of the same bytes in the same
//!    direction (CPU: single-threaded memcpy, the CPU backend running with one thread so both
//!    sides copy on one core; GPU: one `cuMemcpyDtoHAsync` / `cuMemcpyHtoDAsync` between device
//!    memory and pinned host memory). Target: ≥ 0.8× the raw copy.
//!
//! `--gpu-only` skips the CPU part (the GPU check's time is short).
//!
//! With `--features cuda` on a machine with a GPU, both run again on the CUDA backend (memory ops
//! only: direct swap copies, no kernels), against cuMemAlloc/cuMemFree and a raw pinned copy;
//! otherwise the GPU part is skipped with a message.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use djinn_backend::cpu::CpuBackend;
use djinn_backend::{Backend, DType, KvLayout};
use djinn_vmu::prometheus::Registry;
use djinn_vmu::{OffsetAllocator, Vmu, VmuConfig, MIB};
use hdrhistogram::Histogram;

const PAIRS: usize = 200_000;
const LIVE: usize = 1_000;

struct Lat {
    p50_ns: u64,
    p99_ns: u64,
}

fn lat(h: &Histogram<u64>) -> Lat {
    Lat { p50_ns: h.value_at_quantile(0.5), p99_ns: h.value_at_quantile(0.99) }
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 10_000_000_000, 3).expect("histogram bounds")
}

/// Sizes 256 B … 64 KiB (log-uniform), below glibc's mmap threshold so `malloc` stays in its
/// fast path: a fair baseline.
fn sizes(n: usize) -> Vec<usize> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let log2 = 8 + (x % 9) as u32;
            (1usize << log2) + (x >> 32) as usize % (1usize << log2)
        })
        .collect()
}

fn timer_overhead_ns() -> u64 {
    let mut h = hist();
    for _ in 0..PAIRS {
        let t = Instant::now();
        h.record(t.elapsed().as_nanos() as u64).ok();
    }
    lat(&h).p50_ns
}

fn bench_tlsf() -> Lat {
    let sz = sizes(PAIRS + LIVE);
    let mut a = OffsetAllocator::new(1 << 30, LIVE + 16);
    // Fragment the heap: keep every other one of 2×LIVE allocations.
    let mut keep = Vec::new();
    for (i, &s) in sz.iter().take(2 * LIVE).enumerate() {
        let x = a.alloc(s, 256).expect("warm-up alloc");
        if i % 2 == 0 {
            keep.push(x);
        } else {
            a.free(x);
        }
    }
    let mut h = hist();
    for &s in &sz[LIVE..] {
        let t = Instant::now();
        let x = a.alloc(black_box(s), 256).expect("alloc");
        a.free(black_box(x));
        h.record(t.elapsed().as_nanos() as u64).ok();
    }
    for x in keep {
        a.free(x);
    }
    lat(&h)
}

fn bench_malloc() -> Lat {
    let sz = sizes(PAIRS + LIVE);
    let mut keep = Vec::new();
    for (i, &s) in sz.iter().take(2 * LIVE).enumerate() {
        // SAFETY: plain malloc/free pairs on sizes > 0; every pointer is freed exactly once.
        let p = unsafe { libc::malloc(s) };
        if i % 2 == 0 {
            keep.push(p);
        } else {
            // SAFETY: as above.
            unsafe { libc::free(p) };
        }
    }
    let mut h = hist();
    for &s in &sz[LIVE..] {
        let t = Instant::now();
        // SAFETY: as above; the pointer is freed at once and never dereferenced.
        unsafe {
            let p = libc::malloc(black_box(s));
            libc::free(black_box(p));
        }
        h.record(t.elapsed().as_nanos() as u64).ok();
    }
    for p in keep {
        // SAFETY: as above.
        unsafe { libc::free(p) };
    }
    lat(&h)
}

/// The driver-level baseline: one `reserve` + drop per pair (fewer pairs: it is slow).
fn bench_reserve<B: Backend>(be: &B, pairs: usize) -> Lat {
    let sz = sizes(pairs);
    let mut h = hist();
    for &s in &sz {
        let t = Instant::now();
        let r = be.reserve(black_box(s)).expect("reserve");
        drop(black_box(r));
        h.record(t.elapsed().as_nanos() as u64).ok();
    }
    lat(&h)
}

fn small_layout() -> KvLayout {
    KvLayout { layers: 2, kv_heads: 2, head_dim: 64, block_tokens: 16, dtype: DType::F16 }
}

/// One KV block through the session API: open, append one block's tokens, close.
fn bench_kv_block<B: Backend>(be: Arc<B>) -> Lat {
    let mut cfg = VmuConfig::new(small_layout());
    cfg.kv_capacity_bytes = Some(8 * MIB);
    cfg.host_swap_bytes = Some(MIB);
    cfg.scratch_bytes = MIB;
    cfg.swap_staging_bytes = MIB;
    let mut vmu = Vmu::new(be, cfg, &Registry::new()).expect("vmu");
    let mut slots = Vec::with_capacity(64);
    let mut h = hist();
    for _ in 0..PAIRS / 4 {
        slots.clear();
        let t = Instant::now();
        let s = vmu.open_session().expect("open");
        vmu.append(s, 16, &mut slots).expect("append");
        vmu.close_session(s).expect("close");
        h.record(t.elapsed().as_nanos() as u64).ok();
    }
    lat(&h)
}

fn print_lat(name: &str, l: &Lat, base: &Lat, base_name: &str) {
    println!(
        "  {name:<34} p50 {:>7.3} µs  p99 {:>7.3} µs   (p99 = {:.2}× {base_name}'s)",
        l.p50_ns as f64 / 1e3,
        l.p99_ns as f64 / 1e3,
        l.p99_ns as f64 / base.p99_ns.max(1) as f64
    );
}

/// A layout with 256 KiB blocks (4 layers × K/V × 8 heads × 16 tokens × 128 dims × f16).
fn swap_layout() -> KvLayout {
    KvLayout { layers: 4, kv_heads: 8, head_dim: 128, block_tokens: 16, dtype: DType::F16 }
}

struct SwapFig {
    bytes: usize,
    out_s: f64,
    in_s: f64,
    /// Raw copy device → host (swap-out's direction) and host → device (swap-in's).
    raw_out_s: f64,
    raw_in_s: f64,
    out_p_max_s: f64,
    in_p_max_s: f64,
}

/// Median of several swap-out / swap-in rounds of one session of `bytes`, and of raw copies of
/// the same bytes done by `raw` (returns seconds for one copy out, one copy in).
fn bench_swap<B: Backend>(
    be: Arc<B>,
    bytes: usize,
    raw: &mut dyn FnMut() -> (f64, f64),
    direct_min: Option<usize>,
) -> SwapFig {
    let layout = swap_layout();
    let bb = layout.block_bytes();
    let blocks = bytes / bb;
    let mut cfg = VmuConfig::new(layout);
    cfg.kv_capacity_bytes = Some(bytes + bb);
    cfg.host_swap_bytes = Some(bytes + bb);
    cfg.scratch_bytes = MIB;
    cfg.swap_staging_bytes = 64 * MIB;
    cfg.direct_swap_min_run_bytes = direct_min;
    let reg = Registry::new();
    let mut vmu = Vmu::new(be.clone(), cfg, &reg).expect("vmu");
    let s = vmu.open_session().expect("open");
    vmu.append(s, blocks * layout.block_tokens, &mut Vec::new()).expect("append");
    vmu.end_step();
    // Fault in every page of the region and the pool first.
    let fill = vec![0x5Au8; bytes];
    be.write(vmu.region(), vmu.plan().kv_offset, &fill).expect("fill");
    drop(fill);
    let rounds = if bytes >= 256 * MIB {
        5
    } else if bytes >= 16 * MIB {
        9
    } else {
        31
    };
    let (mut outs, mut ins, mut raw_outs, mut raw_ins) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds + 1 {
        let t = Instant::now();
        vmu.swap_out(&[s]).expect("swap out");
        vmu.sync().expect("sync");
        let o = t.elapsed().as_secs_f64();
        let t = Instant::now();
        vmu.ensure_resident(&[s]).expect("swap in");
        vmu.sync().expect("sync");
        let i = t.elapsed().as_secs_f64();
        vmu.end_step();
        let (ro, ri) = raw();
        if r > 0 {
            outs.push(o);
            ins.push(i);
            raw_outs.push(ro);
            raw_ins.push(ri);
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let out_max = outs.iter().cloned().fold(0.0, f64::max);
    let in_max = ins.iter().cloned().fold(0.0, f64::max);
    SwapFig {
        bytes,
        out_s: med(&mut outs),
        in_s: med(&mut ins),
        raw_out_s: med(&mut raw_outs),
        raw_in_s: med(&mut raw_ins),
        out_p_max_s: out_max,
        in_p_max_s: in_max,
    }
}

fn print_swap(f: &SwapFig, raw_name: &str) {
    let gbs = |s: f64| f.bytes as f64 / s / 1e9;
    println!(
        "  {:>5} MiB  out {:>7.2} GB/s ({:>8.3} ms, max {:>8.3})  in {:>7.2} GB/s ({:>8.3} ms, max {:>8.3})  {raw_name} out {:>7.2} GB/s in {:>7.2} GB/s   ratio out {:.2}× in {:.2}×",
        f.bytes / MIB,
        gbs(f.out_s),
        f.out_s * 1e3,
        f.out_p_max_s * 1e3,
        gbs(f.in_s),
        f.in_s * 1e3,
        f.in_p_max_s * 1e3,
        gbs(f.raw_out_s),
        gbs(f.raw_in_s),
        f.raw_out_s / f.out_s,
        f.raw_in_s / f.in_s
    );
}

fn swap_sizes() -> Vec<usize> {
    if let Some(mib) = std::env::var("DJINN_VMU_BENCH_SWAP_MIB").ok().and_then(|v| v.parse::<usize>().ok()) {
        return vec![mib.max(1) * MIB];
    }
    let max = if std::env::var("DJINN_VMU_BENCH_1GIB").is_ok_and(|v| v == "1") { 1024 } else { 256 };
    [1, 4, 16, 64, 256, 1024].into_iter().filter(|&m| m <= max).map(|m| m * MIB).collect()
}

fn cpu_benches() {
    println!("== alloc+free latency (CPU; timer overhead ≈ {} ns included in every figure)", timer_overhead_ns());
    let base = bench_malloc();
    print_lat("system allocator malloc+free", &base, &base, "itself");
    let tlsf = bench_tlsf();
    print_lat("VMU TLSF alloc+free", &tlsf, &base, "vs malloc");
    let cpu = Arc::new(CpuBackend::with_threads(1).expect("cpu backend"));
    let mmap = bench_reserve(&*cpu, 2_000);
    print_lat("backend reserve+drop (mmap)", &mmap, &base, "vs malloc");
    print_lat("VMU TLSF alloc+free", &tlsf, &mmap, "vs reserve");
    let kv = bench_kv_block(cpu.clone());
    print_lat("VMU KV block open+append+close", &kv, &base, "vs malloc");
    println!(
        "  target p99 ≤ 0.25 µs: TLSF {} ({:.3} µs)",
        if tlsf.p99_ns <= 250 { "met" } else { "MISSED" },
        tlsf.p99_ns as f64 / 1e3
    );

    println!("== swap bandwidth and latency (CPU backend, 1 thread; 256 KiB blocks; direct copies)");
    for bytes in swap_sizes() {
        let mut src = vec![0xA5u8; bytes];
        let mut dst = vec![0u8; bytes];
        dst.copy_from_slice(&src);
        let mut raw = || {
            src[0] = src[0].wrapping_add(1);
            let t = Instant::now();
            dst.copy_from_slice(black_box(&src));
            black_box(&dst);
            let s = t.elapsed().as_secs_f64();
            (s, s)
        };
        let f = bench_swap(cpu.clone(), bytes, &mut raw, None);
        print_swap(&f, "memcpy");
    }
}

#[cfg(feature = "cuda")]
fn gpu_benches() {
    use djinn_backend::cuda::{CudaBackend, KernelSet};
    use djinn_backend::HostBuf;
    static NO_KERNELS: KernelSet = KernelSet { compiler: "none (VMU bench: memory ops only)", modules: &[] };
    let be = match CudaBackend::new(0, &NO_KERNELS) {
        Ok(b) => Arc::new(b),
        Err(e) => {
            println!("== GPU benchmarks skipped: no CUDA device ({e})");
            return;
        }
    };
    println!("== alloc+free latency (GPU {})", be.info().name);
    let driver = bench_reserve(&*be, 2_000);
    print_lat("cuMemAlloc+cuMemFree", &driver, &driver, "itself");
    let tlsf = bench_tlsf();
    print_lat("VMU TLSF alloc+free", &tlsf, &driver, "vs cuMemAlloc");
    let kv = bench_kv_block(be.clone());
    print_lat("VMU KV block open+append+close", &kv, &driver, "vs cuMemAlloc");
    println!("== swap bandwidth and latency (GPU; 256 KiB blocks; direct pinned copies)");
    for bytes in swap_sizes() {
        let region = be.reserve(bytes).expect("reserve");
        let mut host = be.alloc_host(bytes).expect("pinned host");
        let stream = be.new_stream().expect("stream");
        let mut raw = || {
            let t = Instant::now();
            // SAFETY: `host` lives until after the synchronisation below and nothing else
            // touches it meanwhile.
            unsafe { be.copy_d2h_async(&stream, &region, 0, &mut host, 0, bytes).expect("raw d2h") };
            be.sync_stream(&stream).expect("sync");
            let out = t.elapsed().as_secs_f64();
            let t = Instant::now();
            // SAFETY: as above; the device only reads `host`.
            unsafe { be.copy_h2d_async(&stream, &host, 0, &region, 0, bytes).expect("raw h2d") };
            be.sync_stream(&stream).expect("sync");
            (out, t.elapsed().as_secs_f64())
        };
        let f = bench_swap(be.clone(), bytes, &mut raw, Some(0));
        print_swap(&f, "raw pinned cuMemcpy");
        if bytes >= 1024 * MIB {
            println!(
                "  target ≥ 0.8× raw pinned each way: out {}, in {}; ≤ 35 ms each way on PCIe Gen5: out {:.1} ms, in {:.1} ms",
                if f.raw_out_s / f.out_s >= 0.8 { "met" } else { "MISSED" },
                if f.raw_in_s / f.in_s >= 0.8 { "met" } else { "MISSED" },
                f.out_s * 1e3,
                f.in_s * 1e3
            );
        }
        black_box(host.as_slice().len());
    }
}

#[cfg(not(feature = "cuda"))]
fn gpu_benches() {
    println!("== GPU benchmarks skipped: built without the `cuda` feature (cargo bench -p djinn-vmu --features cuda)");
}

fn main() {
    // `cargo test --benches` runs bench binaries with `--test`-less args; keep that cheap.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let t = Instant::now();
    if !std::env::args().any(|a| a == "--gpu-only") {
        cpu_benches();
    }
    gpu_benches();
    println!("(total {:.1} s)", Duration::as_secs_f64(&t.elapsed()));
}
