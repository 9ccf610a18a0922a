//! shm transport benchmark: round-trip latency percentiles (HDR histogram) for payloads of
//! 8 B … 64 MiB and one-direction bandwidth, in busy-poll and spin-then-park modes, beside raw
//! baselines measured in the same run:
//! - latency: a two-thread ping-pong over one cache line in a shared mapping (the floor for any
//!   shared-memory round trip between two cores);
//! - bandwidth: `memcpy` between two shared mappings (one copy, one core).
//!
//! Round trip = request carrying SIZE bytes, reply echoing SIZE bytes. Bandwidth = SIZE bytes one
//! way with an empty acknowledgement, SIZE / median time.
//!
//! `cargo bench --bench transport_shm`; `DJINN_BENCH_QUICK=1` shortens the run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use djinn_proto::FrameHeader;
use djinn_transport::{Connection, OutFrame, TransportOptions, WaitMode};
use hdrhistogram::Histogram;

mod transport_pair;
use transport_pair::{us, Pair};

const OP_ECHO: u16 = 1;
const OP_SINK: u16 = 2;
const SIZE_MAX: usize = 64 << 20;
const SIZES: [usize; 9] = [8, 64, 512, 4096, 65_536, 1 << 20, 4 << 20, 16 << 20, 64 << 20];

/// Short run: `DJINN_BENCH_QUICK=1`, or when run without `--bench` (as `cargo test` runs benches).
fn quick() -> bool {
    static QUICK: OnceLock<bool> = OnceLock::new();
    *QUICK.get_or_init(|| {
        std::env::var("DJINN_BENCH_QUICK").is_ok_and(|v| v == "1") || !std::env::args().any(|a| a == "--bench")
    })
}

/// Iterations for a payload size: many for small frames, few for large ones.
fn iterations(size: usize) -> usize {
    let (bytes_budget, max) = if quick() { (256 << 20, 3000) } else { (2 << 30, 30_000) };
    (bytes_budget / size.max(1)).clamp(if quick() { 4 } else { 10 }, max)
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("histogram bounds")
}

/// A shared anonymous mapping (MAP_SHARED on a memfd), as the transport's region is.
struct SharedMap {
    ptr: *mut u8,
    len: usize,
}

impl SharedMap {
    fn new(len: usize) -> SharedMap {
        // SAFETY: memfd_create with a literal name; the descriptor is checked, sized, mapped, closed.
        unsafe {
            let fd = libc::memfd_create(c"bench".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0, "memfd_create");
            assert_eq!(libc::ftruncate(fd, len as libc::off_t), 0, "ftruncate");
            let ptr =
                libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0);
            libc::close(fd);
            assert_ne!(ptr, libc::MAP_FAILED, "mmap");
            // Touch every page so the baseline does not measure page faults.
            std::ptr::write_bytes(ptr.cast::<u8>(), 1, len);
            SharedMap { ptr: ptr.cast(), len }
        }
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

// SAFETY: the mapping is plain memory; the baselines synchronise through atomics in it.
unsafe impl Send for SharedMap {}
unsafe impl Sync for SharedMap {}

/// Raw baseline: two threads bounce a counter through one cache line of a shared mapping.
fn raw_ping_pong(rounds: usize) -> Histogram<u64> {
    let map = Arc::new(SharedMap::new(4096));
    // SAFETY: offset 0 of a page-aligned mapping that outlives both threads; accessed only atomically.
    let line = |m: &SharedMap| unsafe { &*m.ptr.cast::<AtomicU64>() };
    line(&map).store(0, Ordering::SeqCst);
    let peer = {
        let map = map.clone();
        thread::spawn(move || {
            let l = line(&map);
            for i in 0..rounds as u64 {
                while l.load(Ordering::Acquire) != 2 * i + 1 {
                    std::hint::spin_loop();
                }
                l.store(2 * i + 2, Ordering::Release);
            }
        })
    };
    let l = line(&map);
    let mut h = histogram();
    for i in 0..rounds as u64 {
        let t0 = Instant::now();
        l.store(2 * i + 1, Ordering::Release);
        while l.load(Ordering::Acquire) != 2 * i + 2 {
            std::hint::spin_loop();
        }
        h.record(t0.elapsed().as_nanos() as u64).unwrap();
    }
    peer.join().unwrap();
    h
}

/// Raw baseline: memcpy of `size` bytes between two shared mappings; median GB/s.
fn raw_memcpy_gbps(size: usize) -> f64 {
    let (a, b) = (SharedMap::new(size), SharedMap::new(size));
    let mut times = Vec::new();
    for _ in 0..iterations(size).clamp(5, 200) {
        let t0 = Instant::now();
        // SAFETY: two distinct live mappings of `size` bytes each.
        unsafe { std::ptr::copy_nonoverlapping(a.ptr, b.ptr, size) };
        times.push(t0.elapsed());
    }
    gbps(size, median(&mut times))
}

fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn gbps(size: usize, t: Duration) -> f64 {
    size as f64 / t.as_secs_f64() / 1e9
}

/// The server side: echoes OP_ECHO frames, acknowledges OP_SINK frames with an empty reply.
fn serve(mut c: Connection) {
    let mut buf = vec![0u8; SIZE_MAX];
    loop {
        let Ok(head) = c.rx.recv_head() else { return };
        let len = head.header.data_len.get() as usize;
        if c.rx.recv_data(&mut buf[..len]).is_err() {
            return;
        }
        let echo = head.header.opcode.get() == OP_ECHO;
        let data_len = if echo { len } else { 0 };
        let reply = FrameHeader::reply_to(&head.header, 0, data_len as u64);
        if c.tx.send(&OutFrame { header: reply, meta: &[], data: &[&buf[..data_len]] }).is_err() {
            return;
        }
    }
}

fn pair(wait: WaitMode) -> Pair {
    static N: AtomicU64 = AtomicU64::new(0);
    let name = format!("bench-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    let opts = TransportOptions { wait, ..TransportOptions::default() };
    let listener = djinn_transport::shm::listen(&name, &opts).expect("listen");
    Pair::new(listener, serve, |_| djinn_transport::shm::connect(&name, &opts).expect("connect"))
}

struct Row {
    size: usize,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    gbps: f64,
}

fn run_mode(wait: WaitMode, src: &[u8], dst: &mut [u8]) -> Vec<Row> {
    let mut pair = pair(wait);
    let mut rows = Vec::new();
    let mut id = 0u64;
    for &size in &SIZES {
        let n = iterations(size);
        for _ in 0..(n / 10).max(2) {
            id += 1;
            pair.round_trip(OP_ECHO, id, &src[..size], dst);
        }
        let mut h = histogram();
        for _ in 0..n {
            id += 1;
            h.record(pair.round_trip(OP_ECHO, id, &src[..size], dst).as_nanos() as u64).unwrap();
        }
        let mut times: Vec<Duration> = (0..n.min(200))
            .map(|_| {
                id += 1;
                pair.round_trip(OP_SINK, id, &src[..size], dst)
            })
            .collect();
        let row = Row {
            size,
            p50_us: us(&h, 0.5),
            p99_us: us(&h, 0.99),
            p999_us: us(&h, 0.999),
            gbps: gbps(size, median(&mut times)),
        };
        println!(
            "shm {:<14} {:>9} B  rtt p50 {:>10.2} us  p99 {:>10.2} us  p999 {:>10.2} us  one-way {:>7.2} GB/s",
            format!("{wait:?}"),
            size,
            row.p50_us,
            row.p99_us,
            row.p999_us,
            row.gbps
        );
        rows.push(row);
    }
    rows
}

/// Raw baselines, measured next to each mode's rows so a change in machine load between modes
/// does not skew the ratios.
struct Baseline {
    ping_pong_p50_us: f64,
    memcpy_gbps: f64,
}

fn baseline(label: &str) -> Baseline {
    let raw = raw_ping_pong(if quick() { 20_000 } else { 200_000 });
    let memcpy_gbps = raw_memcpy_gbps(SIZE_MAX);
    println!(
        "raw baseline ({label}): ping-pong over one shared cache line rtt p50 {:.3} us  p99 {:.3} us  p999 {:.3} us; \
         memcpy between shared mappings, 64 MiB: {memcpy_gbps:.2} GB/s",
        us(&raw, 0.5),
        us(&raw, 0.99),
        us(&raw, 0.999)
    );
    Baseline { ping_pong_p50_us: us(&raw, 0.5), memcpy_gbps }
}

fn main() {
    println!("transport_shm benchmark{}", if quick() { " (quick)" } else { "" });
    let src: Vec<u8> = (0..SIZE_MAX).map(|i| (i * 31 % 251) as u8).collect();
    let mut dst = vec![0u8; SIZE_MAX];
    let mut results = Vec::new();
    for wait in [WaitMode::BusyPoll, WaitMode::SpinThenPark] {
        let before = baseline("before");
        let rows = run_mode(wait, &src, &mut dst);
        let after = baseline("after");
        let base = Baseline {
            ping_pong_p50_us: (before.ping_pong_p50_us + after.ping_pong_p50_us) / 2.0,
            memcpy_gbps: (before.memcpy_gbps + after.memcpy_gbps) / 2.0,
        };
        results.push((wait, rows, base));
    }

    println!("\nratios (against the mean of the baselines measured just before and after each mode):");
    for (wait, rows, base) in &results {
        let r64 = rows.iter().find(|r| r.size == 64).expect("64 B row");
        let big = rows.iter().find(|r| r.size == SIZE_MAX).expect("64 MiB row");
        let name = format!("{wait:?}");
        println!(
            "  {name:<12} 64 B rtt p50 {:.2} us = {:.1}x raw ping-pong ({:.3} us); 64 MiB {:.2} GB/s = {:.2}x memcpy ({:.2} GB/s)",
            r64.p50_us,
            r64.p50_us / base.ping_pong_p50_us,
            base.ping_pong_p50_us,
            big.gbps,
            big.gbps / base.memcpy_gbps,
            base.memcpy_gbps
        );
    }
    let (_, busy, base) = &results[0];
    let r64 = busy.iter().find(|r| r.size == 64).expect("64 B row");
    let big = busy.iter().find(|r| r.size == SIZE_MAX).expect("64 MiB row");
    println!(
        "targets: busy-poll 64 B p50 <= 2 us: {} ({:.2} us); busy-poll 64 MiB >= 0.5x memcpy: {} ({:.2}x)",
        if r64.p50_us <= 2.0 { "met" } else { "MISSED" },
        r64.p50_us,
        if big.gbps >= 0.5 * base.memcpy_gbps { "met" } else { "MISSED" },
        big.gbps / base.memcpy_gbps
    );
}
