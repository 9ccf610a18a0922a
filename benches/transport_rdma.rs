//! rdma transport benchmark, with perftest as the baseline measured in the same run on the same
//! device: `ib_write_lat -s 64` (it reports half a round trip, so the baseline RTT is twice its
//! typical) and `ib_write_bw -s 67108864`.
//!
//! Rows: round-trip latency (request of SIZE bytes, echo of SIZE bytes) for small sizes, and
//! 64 MiB one-way bandwidth both ways: "put" (client sends 64 MiB, server acknowledges with an
//! empty frame) and "get" (empty request, 64 MiB reply), SIZE / median time.
//!
//! Needs an RDMA device that owns 127.0.0.1: run it through the VM,
//! `scripts/rdma-vm -- target/release/deps/transport_rdma-* --bench` (see README). Without a
//! device it says so and exits 0 having measured nothing.

use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use djinn_proto::FrameHeader;
use djinn_transport::{Connection, OutFrame, TransportOptions, WaitMode};
use hdrhistogram::Histogram;

mod transport_pair;
use transport_pair::{us, Pair};

const OP_ECHO: u16 = 1;
const OP_PUT: u16 = 2;
const OP_GET: u16 = 3;
const BIG: usize = 64 << 20;
const LAT_SIZES: [usize; 4] = [8, 64, 4096, 65_536];

fn quick() -> bool {
    std::env::var("DJINN_BENCH_QUICK").is_ok_and(|v| v == "1") || !std::env::args().any(|a| a == "--bench")
}

/// The server side: echoes OP_ECHO, acknowledges OP_PUT empty, answers OP_GET with BIG bytes.
fn serve(mut c: Connection) {
    let mut buf = vec![0u8; BIG];
    loop {
        let Ok(head) = c.rx.recv_head() else { return };
        let len = head.header.data_len.get() as usize;
        if c.rx.recv_data(&mut buf[..len]).is_err() {
            return;
        }
        let out = match head.header.opcode.get() {
            OP_ECHO => len,
            OP_GET => BIG,
            _ => 0,
        };
        let reply = FrameHeader::reply_to(&head.header, 0, out as u64);
        if c.tx.send(&OutFrame { header: reply, meta: &[], data: &[&buf[..out]] }).is_err() {
            return;
        }
    }
}

fn pair(wait: WaitMode) -> Pair {
    let opts = TransportOptions { wait, ..TransportOptions::default() };
    let listener = djinn_transport::rdma::listen("127.0.0.1:0", &opts).expect("listen");
    Pair::new(listener, serve, |url| djinn_transport::connect(url, &opts).expect("connect"))
}

/// Runs a perftest server and client on `dev` over 127.0.0.1; returns the client's result line
/// for `size` split into columns.
fn perftest(tool: &str, dev: &str, size: usize, extra: &[&str], port: u16) -> Option<Vec<f64>> {
    let args = |client: bool| {
        let mut a: Vec<String> =
            vec!["-d".into(), dev.into(), "-s".into(), size.to_string(), "-p".into(), port.to_string()];
        a.extend(extra.iter().map(|s| s.to_string()));
        if client {
            a.push("127.0.0.1".into());
        }
        a
    };
    let mut server = Command::new(tool).args(args(false)).stdout(Stdio::null()).stderr(Stdio::null()).spawn().ok()?;
    // Under TCG the server may take a while to listen; a client that finds nobody fails at once.
    thread::sleep(Duration::from_secs(2));
    let out = Command::new(tool).args(args(true)).stderr(Stdio::null()).output().ok();
    // Never hang on a server whose client did not come: give it a bounded time, then kill it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = server.kill();
            let _ = server.wait();
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let text = String::from_utf8_lossy(&out?.stdout).into_owned();
    // perftest's TSC probe sometimes fails under TCG and it prints inf: treat that as no result.
    text.lines().map(|l| l.split_whitespace().collect::<Vec<_>>()).find_map(|cols| {
        let row: Vec<f64> = cols.iter().filter_map(|c| c.parse::<f64>().ok()).collect();
        (cols.first() == Some(&size.to_string().as_str()) && row.iter().all(|v| v.is_finite())).then_some(row)
    })
}

struct Baseline {
    /// Twice `ib_write_lat`'s typical (it reports half a round trip).
    rtt_us: f64,
    /// `ib_write_bw` average at 64 MiB, GB/s (decimal).
    gbps: f64,
}

fn baseline(dev: &str, port: u16) -> Option<Baseline> {
    let n = if quick() { "300" } else { "2000" };
    // Up to three tries each, on fresh ports (a failed run may leave its port briefly bound).
    // Columns: bytes, iterations, t_min, t_max, t_typical, ...
    let lat = (0..3).find_map(|k| perftest("ib_write_lat", dev, 64, &["-n", n], port + 10 * k))?;
    // Columns: bytes, iterations, BW peak, BW average (Gb/s with --report_gbits), msg rate.
    let bw =
        (0..3).find_map(|k| perftest("ib_write_bw", dev, BIG, &["-n", "5", "--report_gbits"], port + 1 + 10 * k))?;
    let b = Baseline { rtt_us: 2.0 * lat.get(4)?, gbps: bw.get(3)? / 8.0 };
    println!(
        "perftest baseline: ib_write_lat -s 64 typical {:.2} us (rtt {:.2} us); ib_write_bw -s 64MiB {:.4} GB/s",
        b.rtt_us / 2.0,
        b.rtt_us,
        b.gbps
    );
    Some(b)
}

/// 64 B p50 RTT (µs), put and get GB/s for one wait mode.
fn run_mode(wait: WaitMode, src: &[u8], dst: &mut [u8]) -> (f64, f64, f64) {
    let mut pair = pair(wait);
    let mut id = 0u64;
    let mut p50_64 = 0.0;
    for &size in &LAT_SIZES {
        let n = if quick() { 200 } else { 2000 };
        for _ in 0..n / 10 {
            id += 1;
            pair.round_trip(OP_ECHO, id, &src[..size], dst);
        }
        let mut h = Histogram::<u64>::new_with_bounds(1, 120_000_000_000, 3).expect("bounds");
        for _ in 0..n {
            id += 1;
            h.record(pair.round_trip(OP_ECHO, id, &src[..size], dst).as_nanos() as u64).unwrap();
        }
        println!(
            "rdma {:<14} {:>9} B  rtt p50 {:>9.2} us  p99 {:>9.2} us  p999 {:>9.2} us",
            format!("{wait:?}"),
            size,
            us(&h, 0.5),
            us(&h, 0.99),
            us(&h, 0.999)
        );
        if size == 64 {
            p50_64 = us(&h, 0.5);
        }
    }
    let reps = if quick() { 2 } else { 3 };
    let mut median = |op: u16, src: &[u8]| {
        let mut t: Vec<Duration> = (0..reps)
            .map(|_| {
                id += 1;
                pair.round_trip(op, id, src, dst)
            })
            .collect();
        t.sort();
        BIG as f64 / t[t.len() / 2].as_secs_f64() / 1e9
    };
    let put = median(OP_PUT, &src[..BIG]);
    let get = median(OP_GET, &[]);
    println!("rdma {:<14} 64 MiB put {put:.4} GB/s  get {get:.4} GB/s", format!("{wait:?}"));
    (p50_64, put, get)
}

fn main() {
    let devices = djinn_transport::rdma::device_names();
    let Some(dev) = devices.first().cloned() else {
        println!("transport_rdma: no RDMA device here; run it through scripts/rdma-vm (soft-RoCE). Nothing measured.");
        return;
    };
    println!("transport_rdma benchmark on {dev}{}", if quick() { " (quick)" } else { "" });
    let src: Vec<u8> = (0..BIG).map(|i| (i * 31 % 251) as u8).collect();
    let mut dst = vec![0u8; BIG];
    let before = baseline(&dev, 18515);
    let busy = run_mode(WaitMode::BusyPoll, &src, &mut dst);
    let park = run_mode(WaitMode::SpinThenPark, &src, &mut dst);
    let after = baseline(&dev, 18545);
    let (Some(b), Some(a)) = (before, after) else {
        println!("perftest (ib_write_lat, ib_write_bw) did not run: no ratios");
        return;
    };
    let base = Baseline { rtt_us: (b.rtt_us + a.rtt_us) / 2.0, gbps: (b.gbps + a.gbps) / 2.0 };
    println!("\nratios (against the mean of perftest just before and after):");
    for (name, (p50, put, get)) in [("BusyPoll", busy), ("SpinThenPark", park)] {
        println!(
            "  {name:<12} 64 B rtt p50 {p50:.2} us = {:.2}x 2*ib_write_lat ({:.2} us); 64 MiB put {:.2}x, get {:.2}x ib_write_bw ({:.4} GB/s)",
            p50 / base.rtt_us,
            base.rtt_us,
            put / base.gbps,
            get / base.gbps,
            base.gbps
        );
    }
    let (p50, put, get) = busy;
    println!(
        "targets: busy-poll 64 B p50 <= 1.3x: {} ({:.2}x); 64 MiB put and get >= 0.8x: {} ({:.2}x, {:.2}x)",
        if p50 <= 1.3 * base.rtt_us { "met" } else { "MISSED" },
        p50 / base.rtt_us,
        if put.min(get) >= 0.8 * base.gbps { "met" } else { "MISSED" },
        put / base.gbps,
        get / base.gbps
    );
}
