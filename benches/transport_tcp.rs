//! TCP transport round trips by payload size, beside a raw baseline measured in the same run.
//!
//! For each payload size (8 B … 64 MiB) a client sends one frame (32-byte header + payload) and an
//! echo server on another thread sends it back; the round-trip time goes into an HDR histogram.
//! Configurations: tcp on io_uring and on plain sockets, each in SpinThenPark and BusyPoll, and the
//! baseline "raw": a plain non-blocking busy-poll loopback socket pair echoing the bare payload.
//! Bandwidth is `size × count / elapsed` (one direction), as `djinn-dataplane ping` reports it.
//! A second table compares io_uring sends with and without SENDMSG_ZC (the zero-copy threshold).
//!
//! `cargo bench --bench transport_tcp`; `DJINN_BENCH_QUICK=1` shortens every run,
//! `DJINN_BENCH_SIZES=8,64` picks payload sizes, `DJINN_BENCH_NO_ZC=1` skips the zero-copy table,
//! `DJINN_BENCH_SPIN_US=N` sets the spin time of SpinThenPark.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use djinn_proto::FrameHeader;
use djinn_transport::{Connection, OutFrame, TransportError, TransportOptions, WaitMode};
use hdrhistogram::Histogram;

const SIZES: &[usize] = &[8, 64, 512, 4096, 65536, 1 << 20, 16 << 20, 64 << 20];

/// Payload sizes to run: `DJINN_BENCH_SIZES=64,1048576` picks some; default all of `SIZES`.
fn sizes() -> Vec<usize> {
    match std::env::var("DJINN_BENCH_SIZES") {
        Ok(v) => v.split(',').filter_map(|s| s.trim().parse().ok()).filter(|&s| s <= SIZE_MAX).collect(),
        Err(_) => SIZES.to_vec(),
    }
}
const SIZE_MAX: usize = 64 << 20;

fn quick() -> bool {
    std::env::var_os("DJINN_BENCH_QUICK").is_some_and(|v| v != "0")
}

/// Round trips per size: enough for a stable p999 on small payloads, bounded time on large ones.
fn iterations(size: usize) -> usize {
    let full = match size {
        0..=4096 => 20_000,
        4097..=65536 => 5_000,
        65537..=1_048_576 => 300,
        1_048_577..=16_777_216 => 24,
        _ => 8,
    };
    if quick() {
        (full / 10).max(3)
    } else {
        full
    }
}

struct Stats {
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    gbps: f64,
}

fn stats(h: &Histogram<u64>, size: usize, count: usize, elapsed: Duration) -> Stats {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Stats {
        p50_us: us(0.5),
        p99_us: us(0.99),
        p999_us: us(0.999),
        gbps: size as f64 * count as f64 / elapsed.as_secs_f64() / 1e9,
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("histogram bounds")
}

/// Runs `count` timed round trips after a warm-up, each through `rt`.
fn measure(size: usize, mut rt: impl FnMut()) -> Stats {
    let count = iterations(size);
    for _ in 0..(count / 10).clamp(1, 1000) {
        rt();
    }
    let mut h = histogram();
    let start = Instant::now();
    for _ in 0..count {
        let t = Instant::now();
        rt();
        h.record(t.elapsed().as_nanos().max(1) as u64).expect("record");
    }
    stats(&h, size, count, start.elapsed())
}

// ------------------------------------------------------------------------------------------------
// Raw baseline: non-blocking busy-poll socket pair, bare payload both ways.

fn busy_write(s: &mut TcpStream, mut buf: &[u8]) {
    while !buf.is_empty() {
        match s.write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) => panic!("raw write: {e}"),
        }
    }
}

/// Returns false on EOF.
fn busy_read(s: &mut TcpStream, buf: &mut [u8]) -> bool {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) => return false,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) => panic!("raw read: {e}"),
        }
    }
    true
}

fn raw_pair() -> (TcpStream, thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_nodelay(true).unwrap();
        s.set_nonblocking(true).unwrap();
        let mut len = [0u8; 8];
        let mut buf = vec![0u8; SIZE_MAX];
        // The run starts with the payload size (8 bytes); the echo then reflects bare payloads.
        if !busy_read(&mut s, &mut len) {
            return;
        }
        let n = u64::from_le_bytes(len) as usize;
        while busy_read(&mut s, &mut buf[..n]) {
            busy_write(&mut s, &buf[..n]);
        }
    });
    let c = TcpStream::connect(addr).unwrap();
    c.set_nodelay(true).unwrap();
    c.set_nonblocking(true).unwrap();
    (c, server)
}

fn bench_raw(size: usize) -> Stats {
    let (mut c, server) = raw_pair();
    busy_write(&mut c, &(size as u64).to_le_bytes());
    let out = vec![0x5a_u8; size];
    let mut back = vec![0u8; size];
    let s = measure(size, || {
        busy_write(&mut c, &out);
        assert!(busy_read(&mut c, &mut back));
    });
    drop(c);
    server.join().unwrap();
    s
}

// ------------------------------------------------------------------------------------------------
// djinn transport: echo server on its own thread, one connection.

fn echo_server(opts: &TransportOptions) -> (String, thread::JoinHandle<()>) {
    let mut l = djinn_transport::listen("tcp://127.0.0.1:0", opts).unwrap();
    let url = l.url();
    let t = thread::spawn(move || {
        let mut c = l.accept().unwrap();
        let mut buf = vec![0u8; SIZE_MAX];
        loop {
            let head = match c.rx.recv_head() {
                Ok(h) => h,
                Err(TransportError::Closed) => return,
                Err(e) => panic!("server recv: {e}"),
            };
            let n = head.header.data_len.get() as usize;
            c.rx.recv_data(&mut buf[..n]).unwrap();
            let reply = FrameHeader::reply_to(&head.header, 0, n as u64);
            c.tx.send(&OutFrame { header: reply, meta: &[], data: &[&buf[..n]] }).unwrap();
        }
    });
    (url, t)
}

fn bench_transport(opts: &TransportOptions, size: usize) -> (Stats, &'static str) {
    let (url, server) = echo_server(opts);
    let mut c: Connection = djinn_transport::connect(&url, opts).unwrap();
    let out = vec![0x5a_u8; size];
    let mut back = vec![0u8; size];
    let mut id = 0u64;
    let s = measure(size, || {
        id += 1;
        let header = FrameHeader::new(2, 0, id, 0, size as u64);
        c.tx.send(&OutFrame { header, meta: &[], data: &[&out] }).unwrap();
        let head = c.rx.recv_head().unwrap();
        c.rx.recv_data(&mut back[..head.header.data_len.get() as usize]).unwrap();
    });
    let transport = c.transport;
    drop(c);
    server.join().unwrap();
    (s, transport)
}

/// `DJINN_BENCH_SPIN_US` overrides the spin time of SpinThenPark (default: the transport's).
fn opts(wait: WaitMode, force_socket: bool) -> TransportOptions {
    let mut o = TransportOptions { wait, force_socket, ..TransportOptions::default() };
    if let Some(us) = std::env::var("DJINN_BENCH_SPIN_US").ok().and_then(|v| v.parse().ok()) {
        o.spin_us = us;
    }
    o
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: run only the former.
    if !std::env::args().any(|a| a == "--bench") {
        println!("transport_tcp: run with `cargo bench --bench transport_tcp`");
        return;
    }
    let uring = djinn_transport::tcp::uring_available();
    if let Err(e) = &uring {
        println!("io_uring unavailable ({e}): the tcp rows below run the socket fallback");
    }
    let configs: [(&str, TransportOptions); 4] = [
        ("uring/spin-park", opts(WaitMode::SpinThenPark, false)),
        ("uring/busy", opts(WaitMode::BusyPoll, false)),
        ("socket/spin-park", opts(WaitMode::SpinThenPark, true)),
        ("socket/busy", opts(WaitMode::BusyPoll, true)),
    ];
    println!(
        "{:>9} {:<17} {:>10} {:>10} {:>10} {:>9} {:>8} {:>8}",
        "size", "config", "p50_us", "p99_us", "p999_us", "GB/s", "p50/raw", "bw/raw"
    );
    for size in sizes() {
        let raw = bench_raw(size);
        let row = |name: &str, s: &Stats| {
            println!(
                "{:>9} {:<17} {:>10.2} {:>10.2} {:>10.2} {:>9.3} {:>8.2} {:>8.2}",
                size,
                name,
                s.p50_us,
                s.p99_us,
                s.p999_us,
                s.gbps,
                s.p50_us / raw.p50_us,
                s.gbps / raw.gbps
            );
        };
        row("raw (busy)", &raw);
        for (name, o) in &configs {
            let (s, transport) = bench_transport(o, size);
            row(&format!("{name}{}", if transport == "tcp" { "" } else { "*" }), &s);
        }
    }
    println!("(* = plain-socket engine)");

    if uring.is_ok() && std::env::var_os("DJINN_BENCH_NO_ZC").is_none() {
        println!("\nzero-copy send (io_uring, busy-poll): SENDMSG vs SENDMSG_ZC");
        println!("{:>9} {:>12} {:>12} {:>8}", "size", "copy_GB/s", "zc_GB/s", "zc/copy");
        for &size in &[16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20] {
            let mut copy = opts(WaitMode::BusyPoll, false);
            copy.zerocopy_send_bytes_min = usize::MAX;
            let mut zc = copy.clone();
            zc.zerocopy_send_bytes_min = 0;
            let (c, _) = bench_transport(&copy, size);
            let (z, _) = bench_transport(&zc, size);
            println!("{:>9} {:>12.3} {:>12.3} {:>8.2}", size, c.gbps, z.gbps, z.gbps / c.gbps);
        }
    }
}
