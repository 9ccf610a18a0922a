//! Prometheus metrics and the `/healthz` + `/metrics` HTTP endpoint (one `poll(2)` thread).
//!
//! Every metric is registered once at start-up in the server's own [`Registry`] (not the global
//! one, so several servers in one process — tests, benches — do not collide). Label sets are
//! closed: opcodes and error kinds come from fixed name tables, never from peer input.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Buckets for per-request times, in seconds: 1 µs … 10 s, dense at the low end where the
/// server's own overhead lives.
const LATENCY_BUCKETS_S: &[f64] = &[
    1e-6, 2e-6, 3e-6, 4e-6, 5e-6, 7.5e-6, 10e-6, 15e-6, 20e-6, 30e-6, 50e-6, 75e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3,
    5e-3, 10e-3, 20e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5, 10.0,
];

/// The server's metrics. Cheap to clone (every field is an `Arc` inside).
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub connections_active: IntGauge,
    pub connections_total: IntCounterVec,
    pub connections_refused_total: IntCounter,
    pub requests_total: IntCounterVec,
    pub bytes_received_total: IntCounter,
    pub bytes_sent_total: IntCounter,
    pub errors_total: IntCounterVec,
    /// Header received → reply sent, by opcode (includes bulk data transfer and compute).
    pub request_duration_s: HistogramVec,
    /// Header received → reply handed to the transport, for requests without bulk data or
    /// compute (ping, free, handshake): the server's own per-request overhead.
    pub server_time_s: Histogram,
    pub tensors_live: IntGauge,
    pub tensor_bytes_live: IntGauge,
    /// Sessions open over all models.
    pub sessions_open: IntGauge,
    /// Sessions whose KV lives in the host swap pool.
    pub sessions_swapped: IntGauge,
    /// Decode start to first token frame sent.
    pub ttft_s: Histogram,
    /// Time between consecutive token frames of one decode.
    pub token_latency_s: Histogram,
    pub tokens_generated_total: IntCounter,
    /// Engine steps run (one batched forward per model each).
    pub engine_steps_total: IntCounter,
    /// Sessions in one engine step.
    pub engine_batch_sessions: Histogram,
    /// Wire bytes of one decode step of one session (its token frame).
    pub step_bytes: Histogram,
    /// Further registries rendered with this one (each model's VMU metrics, labelled by model).
    extra: Arc<Mutex<Vec<Registry>>>,
}

impl Metrics {
    pub fn new(node_id: &str) -> Self {
        let registry =
            Registry::new_custom(Some("djinn".into()), Some([("node".to_owned(), node_id.to_owned())].into()))
                .expect("static registry options");
        let m = Metrics {
            connections_active: IntGauge::new("connections_active", "Connections currently open").unwrap(),
            connections_total: IntCounterVec::new(
                Opts::new("connections_total", "Connections accepted, by transport"),
                &["transport"],
            )
            .unwrap(),
            connections_refused_total: IntCounter::new(
                "connections_refused_total",
                "Connections refused: max_connections open, or the tenant at its connections_max",
            )
            .unwrap(),
            requests_total: IntCounterVec::new(
                Opts::new("requests_total", "Requests received, by opcode"),
                &["opcode"],
            )
            .unwrap(),
            bytes_received_total: IntCounter::new("bytes_received_total", "Bytes received from clients").unwrap(),
            bytes_sent_total: IntCounter::new("bytes_sent_total", "Bytes sent to clients").unwrap(),
            errors_total: IntCounterVec::new(
                Opts::new("errors_total", "Error replies and dropped frames, by kind"),
                &["kind"],
            )
            .unwrap(),
            request_duration_s: HistogramVec::new(
                HistogramOpts::new(
                    "request_duration_seconds",
                    "Request header received to reply sent, by opcode (data transfer and compute included)",
                )
                .buckets(LATENCY_BUCKETS_S.to_vec()),
                &["opcode"],
            )
            .unwrap(),
            server_time_s: Histogram::with_opts(
                HistogramOpts::new(
                    "server_time_seconds",
                    "Server's own time from request received to reply queued, requests without bulk data or compute",
                )
                .buckets(LATENCY_BUCKETS_S.to_vec()),
            )
            .unwrap(),
            tensors_live: IntGauge::new("tensors_live", "Tensor handles currently held").unwrap(),
            tensor_bytes_live: IntGauge::new("tensor_bytes_live", "Tensor bytes currently held").unwrap(),
            sessions_open: IntGauge::new("sessions_open", "Sessions open").unwrap(),
            sessions_swapped: IntGauge::new("sessions_swapped", "Sessions whose KV is swapped out to host memory")
                .unwrap(),
            ttft_s: Histogram::with_opts(
                HistogramOpts::new("ttft_seconds", "Decode request received to first token frame sent")
                    .buckets(LATENCY_BUCKETS_S.to_vec()),
            )
            .unwrap(),
            token_latency_s: Histogram::with_opts(
                HistogramOpts::new("token_latency_seconds", "Time between consecutive token frames of a decode")
                    .buckets(LATENCY_BUCKETS_S.to_vec()),
            )
            .unwrap(),
            tokens_generated_total: IntCounter::new("tokens_generated_total", "Tokens generated by decodes").unwrap(),
            engine_steps_total: IntCounter::new("engine_steps_total", "Batched engine steps run").unwrap(),
            engine_batch_sessions: Histogram::with_opts(
                HistogramOpts::new("engine_batch_sessions", "Sessions in one batched engine step")
                    .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
            )
            .unwrap(),
            step_bytes: Histogram::with_opts(
                HistogramOpts::new("step_bytes", "Wire bytes sent per decode step of one session (its token frame)")
                    .buckets(vec![32.0, 48.0, 64.0, 96.0, 128.0, 256.0, 1024.0, 4096.0, 65536.0, 1048576.0]),
            )
            .unwrap(),
            extra: Arc::new(Mutex::new(Vec::new())),
            registry,
        };
        let r = &m.registry;
        r.register(Box::new(m.connections_active.clone())).unwrap();
        r.register(Box::new(m.connections_total.clone())).unwrap();
        r.register(Box::new(m.connections_refused_total.clone())).unwrap();
        r.register(Box::new(m.requests_total.clone())).unwrap();
        r.register(Box::new(m.bytes_received_total.clone())).unwrap();
        r.register(Box::new(m.bytes_sent_total.clone())).unwrap();
        r.register(Box::new(m.errors_total.clone())).unwrap();
        r.register(Box::new(m.request_duration_s.clone())).unwrap();
        r.register(Box::new(m.server_time_s.clone())).unwrap();
        r.register(Box::new(m.tensors_live.clone())).unwrap();
        r.register(Box::new(m.tensor_bytes_live.clone())).unwrap();
        r.register(Box::new(m.sessions_open.clone())).unwrap();
        r.register(Box::new(m.sessions_swapped.clone())).unwrap();
        r.register(Box::new(m.ttft_s.clone())).unwrap();
        r.register(Box::new(m.token_latency_s.clone())).unwrap();
        r.register(Box::new(m.tokens_generated_total.clone())).unwrap();
        r.register(Box::new(m.engine_steps_total.clone())).unwrap();
        r.register(Box::new(m.engine_batch_sessions.clone())).unwrap();
        r.register(Box::new(m.step_bytes.clone())).unwrap();
        m
    }

    /// A registry for one model's VMU metrics (names already carry `djinn_`), labelled with the
    /// node and `model`, rendered by [`Metrics::render`] with the server's own.
    pub fn model_registry(&self, node_id: &str, model: &str) -> Registry {
        let labels = [("node".to_owned(), node_id.to_owned()), ("model".to_owned(), model.to_owned())].into();
        let r = Registry::new_custom(None, Some(labels)).expect("static registry options");
        self.extra.lock().unwrap_or_else(|p| p.into_inner()).push(r.clone());
        r
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let mut families = self.registry.gather();
        // Every model's VMU registers the same names: merge them into one family per name.
        for r in self.extra.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            for mut f in r.gather() {
                match families.iter_mut().find(|g| g.name() == f.name()) {
                    Some(g) => g.mut_metric().extend(f.take_metric()),
                    None => families.push(f),
                }
            }
        }
        let _ = TextEncoder::new().encode(&families, &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("metrics endpoint on {addr}: {msg}")]
pub struct HttpError {
    pub addr: String,
    pub msg: String,
}

/// The running HTTP endpoint. Dropping it does not stop it; call [`HttpEndpoint::stop`].
///
/// One thread serves every HTTP connection with `poll(2)`: at most `conns_max` are held at once
/// (a new one beyond it closes the oldest), each must send its request within `request_timeout`,
/// and a request is at most [`HTTP_REQUEST_BYTES_MAX`] bytes. Idle or slow clients therefore
/// cost a bounded table entry, never a thread, and cannot make `/healthz` time out.
pub struct HttpEndpoint {
    stop: Arc<AtomicBool>,
    wake: std::net::UdpSocket,
    thread: Option<JoinHandle<()>>,
    pub addr: String,
}

/// Longest request head read (`GET /metrics HTTP/1.1` plus headers).
const HTTP_REQUEST_BYTES_MAX: usize = 4096;

/// What the endpoint answers and how much it holds.
pub struct HttpOptions {
    pub conns_max: usize,
    pub request_timeout: std::time::Duration,
}

struct HttpConn {
    stream: std::net::TcpStream,
    since: std::time::Instant,
    buf: Vec<u8>,
}

impl HttpEndpoint {
    /// Serves `/healthz` (200 while `healthy` is set, else 503) and `/metrics` on `addr`.
    pub fn start(addr: &str, metrics: Metrics, healthy: Arc<AtomicBool>, opts: HttpOptions) -> Result<Self, HttpError> {
        let err = |e: std::io::Error| HttpError { addr: addr.to_owned(), msg: e.to_string() };
        let listener = std::net::TcpListener::bind(addr).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        let bound = listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| addr.to_owned());
        // A loopback datagram socket wakes the poll loop on stop (std has no eventfd).
        let wake = std::net::UdpSocket::bind("127.0.0.1:0").map_err(err)?;
        let wake_rx = wake.try_clone().map_err(err)?;
        wake.connect(wake_rx.local_addr().map_err(err)?).map_err(err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::Builder::new()
            .name("djinn-http".into())
            .spawn(move || serve_http(&listener, &wake_rx, &st, &metrics, &healthy, &opts))
            .map_err(err)?;
        Ok(HttpEndpoint { stop, wake, thread: Some(thread), addr: bound })
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.send(&[1]);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_http(
    listener: &std::net::TcpListener,
    wake: &std::net::UdpSocket,
    stop: &AtomicBool,
    metrics: &Metrics,
    healthy: &AtomicBool,
    opts: &HttpOptions,
) {
    use std::os::fd::AsRawFd;
    let mut conns: std::collections::VecDeque<HttpConn> = std::collections::VecDeque::with_capacity(opts.conns_max);
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(opts.conns_max + 2);
    let timeout_ms = (opts.request_timeout.as_millis() as i32).clamp(1, 1000);
    while !stop.load(Ordering::Acquire) {
        fds.clear();
        for fd in [listener.as_raw_fd(), wake.as_raw_fd()].into_iter().chain(conns.iter().map(|c| c.stream.as_raw_fd()))
        {
            fds.push(libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
        }
        // SAFETY: `fds` is a live, exclusively borrowed array of `fds.len()` pollfd entries.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n < 0 {
            continue; // EINTR
        }
        // Requests first (their revents index the table as it was), then expiry, then accepts.
        let mut i = 0usize;
        let mut k = 2usize;
        while i < conns.len() {
            let ready = fds[k].revents != 0;
            k += 1;
            let done = if ready { read_request(&mut conns[i], metrics, healthy) } else { false };
            if done || conns[i].since.elapsed() > opts.request_timeout {
                conns.remove(i);
            } else {
                i += 1;
            }
        }
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if conns.len() >= opts.conns_max {
                        conns.pop_front();
                    }
                    conns.push_back(HttpConn { stream, since: std::time::Instant::now(), buf: Vec::new() });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!(error = %e, "metrics accept failed");
                    break;
                }
            }
        }
    }
}

/// Reads what arrived; once the request head is complete, answers it. Returns true when the
/// connection is finished (answered, closed by the peer, or over the size bound).
fn read_request(c: &mut HttpConn, metrics: &Metrics, healthy: &AtomicBool) -> bool {
    use std::io::{Read, Write};
    let mut chunk = [0u8; 1024];
    match c.stream.read(&mut chunk) {
        Ok(0) => return true,
        Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
        Err(_) => return true,
    }
    if !c.buf.windows(4).any(|w| w == b"\r\n\r\n") && !c.buf.windows(2).any(|w| w == b"\n\n") {
        return c.buf.len() > HTTP_REQUEST_BYTES_MAX;
    }
    let line = c.buf.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let path = std::str::from_utf8(line).ok().and_then(|l| l.split_whitespace().nth(1)).unwrap_or("");
    let path = path.split('?').next().unwrap_or("");
    let (code, ctype, body) = match path {
        "/healthz" if healthy.load(Ordering::Acquire) => (200, "text/plain", "ok\n".to_owned()),
        "/healthz" => (503, "text/plain", "starting or draining\n".to_owned()),
        "/metrics" => (200, "text/plain; version=0.0.4; charset=utf-8", metrics.render()),
        _ => (404, "text/plain", "not found\n".to_owned()),
    };
    let reason = match code {
        200 => "OK",
        503 => "Service Unavailable",
        _ => "Not Found",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    // The answer is small: send it blocking, bounded by a write timeout, then close.
    let _ = c.stream.set_nonblocking(false);
    let _ = c.stream.set_write_timeout(Some(std::time::Duration::from_secs(1)));
    if let Err(e) = c.stream.write_all(head.as_bytes()).and_then(|()| c.stream.write_all(body.as_bytes())) {
        tracing::debug!(error = %e, "metrics client went away");
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: &str, path: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn idle_clients_cannot_starve_healthz() {
        let healthy = Arc::new(AtomicBool::new(true));
        let opts = HttpOptions { conns_max: 8, request_timeout: std::time::Duration::from_secs(30) };
        let mut h = HttpEndpoint::start("127.0.0.1:0", Metrics::new("t"), healthy.clone(), opts).unwrap();
        let idle: Vec<std::net::TcpStream> = (0..100).map(|_| std::net::TcpStream::connect(&h.addr).unwrap()).collect();
        let t0 = std::time::Instant::now();
        assert!(get(&h.addr, "/healthz").starts_with("HTTP/1.1 200"));
        assert!(t0.elapsed() < std::time::Duration::from_secs(2), "healthz took {:?}", t0.elapsed());
        assert!(get(&h.addr, "/metrics").contains("djinn_connections_active"));
        healthy.store(false, Ordering::Release);
        assert!(get(&h.addr, "/healthz").starts_with("HTTP/1.1 503"));
        drop(idle);
        h.stop();
    }
}
