//! Prometheus metrics and the `/healthz` + `/metrics` HTTP endpoint (`tiny_http`).
//!
//! Every metric is registered once at start-up in the server's own [`Registry`] (not the global
//! one, so several servers in one process — tests, benches — do not collide). Label sets are
//! closed: opcodes and error kinds come from fixed name tables, never from peer input.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
                "Connections refused because max_connections were open",
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
        m
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
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
pub struct HttpEndpoint {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    pub addr: String,
}

impl HttpEndpoint {
    /// Serves `/healthz` (200 while `healthy` is set, else 503) and `/metrics` on `addr`.
    pub fn start(addr: &str, metrics: Metrics, healthy: Arc<AtomicBool>) -> Result<Self, HttpError> {
        let server =
            tiny_http::Server::http(addr).map_err(|e| HttpError { addr: addr.to_owned(), msg: e.to_string() })?;
        let bound = server.server_addr().to_ip().map(|a| a.to_string()).unwrap_or_else(|| addr.to_owned());
        let server = Arc::new(server);
        let s = server.clone();
        let thread = std::thread::Builder::new()
            .name("djinn-http".into())
            .spawn(move || {
                // One request at a time: scrapes are rare and the answer is small.
                for req in s.incoming_requests() {
                    let path = req.url().split('?').next().unwrap_or("").to_owned();
                    let resp = match path.as_str() {
                        "/healthz" if healthy.load(Ordering::Acquire) => tiny_http::Response::from_string("ok\n"),
                        "/healthz" => tiny_http::Response::from_string("starting or draining\n").with_status_code(503),
                        "/metrics" => {
                            let header = tiny_http::Header::from_bytes(
                                &b"Content-Type"[..],
                                &b"text/plain; version=0.0.4; charset=utf-8"[..],
                            )
                            .expect("static header");
                            tiny_http::Response::from_string(metrics.render()).with_header(header)
                        }
                        _ => tiny_http::Response::from_string("not found\n").with_status_code(404),
                    };
                    if let Err(e) = req.respond(resp) {
                        tracing::debug!(error = %e, "metrics client went away");
                    }
                }
            })
            .map_err(|e| HttpError { addr: addr.to_owned(), msg: e.to_string() })?;
        Ok(HttpEndpoint { server, thread: Some(thread), addr: bound })
    }

    pub fn stop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
