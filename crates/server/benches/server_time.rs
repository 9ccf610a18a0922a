//! The server's own cost per request: round trips of an empty Ping through a real in-process
//! server, beside a raw baseline measured in the same run — a bare echo loop on the same
//! transport (recv header → send header) with no server logic. The difference of the medians is
//! what the server adds (dispatch, metrics, reply framing); the `server_time_seconds` histogram
//! gives its own view of received → reply queued.
//!
//! `cargo bench -p djinn-server --bench server_time` (about 10 s). `ITERS` overrides the count.

use std::time::Instant;

use djinn_backend::cpu::CpuBackend;
use djinn_client::{Client, ClientOptions};
use djinn_proto::{FrameHeader, Opcode, FLAG_REPLY};
use djinn_server::{Server, ServerConfig};
use djinn_transport::{OutFrame, TransportOptions};
use hdrhistogram::Histogram;

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 10_000_000_000, 3).expect("static bounds")
}

fn us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1e3
}

/// Raw echo: one thread answers each frame with a bare reply header.
fn raw_rtt(url: &str, iters: u64) -> Histogram<u64> {
    let opts = TransportOptions::default();
    let mut l = djinn_transport::listen(url, &opts).expect("raw listen");
    let url = l.url();
    let echo = std::thread::spawn(move || {
        let mut c = l.accept().expect("raw accept");
        while let Ok(h) = c.rx.recv_head() {
            let r = FrameHeader::new(h.header.opcode.get(), FLAG_REPLY, h.header.request_id.get(), 0, 0);
            if c.tx.send(&OutFrame { header: r, meta: &[], data: &[] }).is_err() {
                break;
            }
        }
    });
    let mut c = djinn_transport::connect(&url, &opts).expect("raw connect");
    let mut h = hist();
    for i in 0..iters + iters / 10 {
        let t = Instant::now();
        let f = FrameHeader::new(Opcode::Ping.as_u16(), 0, i + 1, 0, 0);
        c.tx.send(&OutFrame { header: f, meta: &[], data: &[] }).unwrap();
        c.rx.recv_head().unwrap();
        if i >= iters / 10 {
            h.saturating_record(t.elapsed().as_nanos() as u64);
        }
    }
    drop(c);
    let _ = echo.join();
    h
}

fn server_rtt(listen: &str, iters: u64) -> (Histogram<u64>, f64) {
    let cfg = ServerConfig { listen: vec![listen.to_owned()], ..Default::default() };
    let server = Server::start(cfg, CpuBackend::new().expect("cpu backend")).expect("server");
    let url = server.urls()[0].clone();
    let mut c = Client::connect_with(&url, &ClientOptions::default()).expect("connect");
    let mut h = hist();
    for i in 0..iters + iters / 10 {
        let t = Instant::now();
        c.ping(&[]).unwrap();
        if i >= iters / 10 {
            h.saturating_record(t.elapsed().as_nanos() as u64);
        }
    }
    let st = server.shared().metrics.server_time_s.clone();
    let (sum_s, n) = (st.get_sample_sum(), st.get_sample_count());
    drop(c);
    server.shutdown();
    (h, sum_s / n.max(1) as f64 * 1e6)
}

fn main() {
    // `cargo bench` passes --bench; a plain run of the binary works too.
    let iters: u64 = std::env::var("ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let shm = format!("shm://djinn-bench-{}", std::process::id());
    for (name, raw_url, srv_url) in [
        ("tcp", "tcp://127.0.0.1:0".to_owned(), "tcp://127.0.0.1:0".to_owned()),
        ("shm", format!("{shm}-raw"), format!("{shm}-srv")),
    ] {
        let raw = raw_rtt(&raw_url, iters);
        let (srv, server_time_mean_us) = server_rtt(&srv_url, iters);
        println!(
            "{name:>3} empty ping rtt p50: raw echo {:.2} us, server {:.2} us ({:.2}x raw; {:+.2} us); \
             p99 raw {:.2} us, server {:.2} us; server_time mean {:.2} us (received -> reply queued)",
            us(&raw, 0.5),
            us(&srv, 0.5),
            us(&srv, 0.5) / us(&raw, 0.5),
            us(&srv, 0.5) - us(&raw, 0.5),
            us(&raw, 0.99),
            us(&srv, 0.99),
            server_time_mean_us,
        );
    }
}
