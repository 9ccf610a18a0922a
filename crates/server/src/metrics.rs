//! Prometheus metrics and the `/healthz` + `/metrics` HTTP endpoint (`tiny_http`).
//!
//! Every metric is registered once at start-up in the server's own [`Registry`] (not the global
//! one, so several servers in one process — tests, benches — do not collide). Label sets are
//! closed: opcodes and error kinds come from fixed name tables, never from peer input.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
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
    /// Each model's weight bytes: `kind` = `resident` (in the weights region) or `file` (the
    /// checkpoint's tensor bytes; quantized GGUF tensors stay quantized, so the two are close).
    pub model_weight_bytes: IntGaugeVec,
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
            sessions_open: IntGauge::new("sessions_open", "Sessions open").unwrap(),
            model_weight_bytes: IntGaugeVec::new(
                Opts::new(
                    "model_weight_bytes",
                    "Weight bytes per model: resident in the weights region, or in the file",
                ),
                &["model", "kind"],
            )
            .unwrap(),
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
        r.register(Box::new(m.model_weight_bytes.clone())).unwrap();
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
