//! The server: listeners, accept threads, shared state, start-up and drain.
//!
//! Threads: one accept thread per listener; one reader thread per connection (at most
//! `max_connections`, briefly more while evicted ones exit); one HTTP thread for `/healthz` and
//! `/metrics`; one watchdog thread that closes connections past their handshake, frame-data or
//! idle deadline ([`crate::watchdog`]); at most [`REFUSALS_MAX`] short-lived threads that answer
//! refused clients.
//!
//! Admission: a new connection beyond `handshakes_pending_max` connections still in their
//! handshake, or finding every slot taken while some are, closes the oldest of those (silent
//! floods age out; a real client's Hello takes milliseconds). Otherwise a client finding every
//! slot taken is refused: its first frame is answered `Busy` (so it reads a typed refusal, not a
//! reset), and warnings about refusals are rate-limited. A tenant past its `connections_max` is
//! refused `Busy` at its Hello. A connection's replies go
//! through its `FrameTx` behind a mutex ([`ReplyTx`]) so a later engine thread (sessions) can
//! stream frames on the same connection while the reader parses the next request.
//!
//! Drain (SIGTERM/SIGINT or [`Server::shutdown`]): `/healthz` turns 503, listeners stop
//! accepting, requests that arrive from then on are answered `ShuttingDown`, running generations
//! may finish until `drain_timeout_ms`, then end with `ShuttingDown`. Every wait is bounded, so the
//! process exits within the deadline plus [`DRAIN_GRACE`] whatever clients do. Reader and writer
//! threads still blocked on a client are left to process exit, which closes their sockets.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use djinn_backend::Backend;
use djinn_proto::{FrameHeader, Status, FLAG_REPLY};
use djinn_transport::{Connection, FrameTx, Listener, ListenerStop, OutFrame, TransportError, TransportOptions};

use crate::auth::{Auth, AuthFileError};
use crate::config::{ConfigError, ServerConfig};
use crate::conn::Watch;
use crate::http::{HttpEndpoint, HttpError, HttpOptions};
use crate::metrics::Metrics;
use crate::quota::Quotas;
use crate::session::{SessionService, SessionStartError};
use crate::staging::StagingPool;
use crate::tensors::Store;
use crate::throttle::Throttle;
use crate::watchdog::{Phase, Timeouts, Watchdog, WatchdogThread, Watched};

/// Refused clients answered at once (each by a short-lived thread that reads the client's first
/// frame and answers it `Busy`, within the handshake timeout); beyond it a refusal is a bare
/// close.
pub const REFUSALS_MAX: usize = 16;

/// What drain may take beyond `drain_timeout_ms` (a step in progress, the last frames' flush):
/// SIGTERM ends the process within the deadline plus this, whatever clients do.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// The sending half of a connection, shared by whoever replies on it.
pub type ReplyTx = Arc<Mutex<Box<dyn FrameTx>>>;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Auth(#[from] AuthFileError),
    #[error("listening on {url}: {source}")]
    Listen { url: String, source: TransportError },
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error(transparent)]
    HttpApi(#[from] crate::openai::HttpApiError),
    #[error("starting a thread: {0}")]
    Thread(std::io::Error),
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Sessions(#[from] SessionStartError),
    #[error("making the Exec lanes' backend handles: {0}")]
    Backend(djinn_backend::BackendError),
}

/// State every thread of the server shares.
pub struct Shared<B: Backend> {
    pub cfg: ServerConfig,
    pub backend: Arc<B>,
    pub auth: Auth,
    pub metrics: Metrics,
    pub store: Store<B>,
    pub limits: djinn_proto::Limits,
    /// URL schemes listened on, for the capabilities reply.
    pub transports: Vec<String>,
    pub shutting_down: AtomicBool,
    pub healthy: Arc<AtomicBool>,
    pub connections_active: AtomicUsize,
    /// Requests being served right now, over all connections (drain waits for 0).
    pub requests_active: AtomicUsize,
    pub next_conn_id: AtomicU64,
    /// Host staging for bulk data (allocated at start-up, bounded per connection and tenant).
    pub staging: Arc<StagingPool>,
    /// Every tenant's quota and the connections it holds.
    pub quotas: Arc<Quotas>,
    /// Deadlines of every connection (handshake, frame data, idle) and busy-poll gates.
    pub watchdog: Watchdog,
    /// Refused clients being answered right now (at most [`REFUSALS_MAX`]).
    pub refusals_active: AtomicUsize,
    /// One warning per second about refused connections and handshakes, not one per refusal.
    pub refusals: Throttle,
    /// The models and their sessions (the engine loop).
    pub sessions: Arc<SessionService>,
}

struct AcceptThread {
    url: String,
    stop: ListenerStop,
    thread: Option<JoinHandle<()>>,
}

/// A running server. Generic over the backend so the CPU and CUDA backends plug in alike.
pub struct Server<B: Backend> {
    shared: Arc<Shared<B>>,
    accepts: Vec<AcceptThread>,
    http: Option<HttpEndpoint>,
    /// The OpenAI-compatible HTTP API (`http_listen`).
    api: Option<crate::openai::HttpApi>,
    watchdog: WatchdogThread,
}

fn scheme(url: &str) -> String {
    url.split_once("://").map(|(s, _)| s.to_owned()).unwrap_or_default()
}

impl<B: Backend> Server<B> {
    /// Binds every listener and the metrics endpoint, then starts accepting.
    pub fn start(cfg: ServerConfig, backend: B) -> Result<Self, ServerError> {
        cfg.validate()?;
        let auth = match &cfg.auth_token_file {
            Some(p) => Auth::from_file(p)?,
            None => Auth::anonymous(),
        };
        let opts: TransportOptions = cfg.transport_options()?;
        let metrics = Metrics::new(&cfg.node_id);
        let backend = Arc::new(backend);
        // Every model is loaded before anything listens: a server that answers is ready to serve
        // sessions, and /healthz turns healthy only after this.
        let sessions = SessionService::start(backend.clone(), &cfg, &metrics)?;
        let urls = cfg.listen_urls();
        let mut transports: Vec<String> = Vec::new();
        for s in urls.iter().map(|u| scheme(u)) {
            if !transports.contains(&s) {
                transports.push(s);
            }
        }
        let quotas = Quotas::new(&cfg);
        let lanes =
            crate::lanes::ExecLanes::new(&backend, cfg.exec_streams, Duration::from_millis(cfg.exec_lane_wait_ms))
                .map_err(ServerError::Backend)?;
        let store = Store::new(backend.clone(), lanes, quotas.clone(), cfg.tensor_bytes_max, metrics.clone());
        let timeouts = Timeouts {
            handshake: Duration::from_millis(cfg.handshake_timeout_ms),
            frame_data: Duration::from_millis(cfg.frame_data_timeout_ms),
            idle: Duration::from_millis(cfg.conn_idle_timeout_ms),
            busy_poll_linger: (opts.wait == djinn_transport::WaitMode::BusyPoll)
                .then(|| Duration::from_micros(cfg.busy_poll_linger_us)),
        };
        // Room for every slot, the connections evicted but not yet ended, and refusals.
        let registry = cfg.max_connections + cfg.handshakes_pending_max + REFUSALS_MAX;
        let (watchdog, watchdog_thread) =
            Watchdog::start(timeouts, registry, metrics.clone()).map_err(ServerError::Thread)?;
        let staging = Arc::new(StagingPool::new(
            cfg.staging_pool_bytes,
            cfg.staging_bytes_max_per_conn,
            cfg.staging_bytes_max_per_tenant,
        ));
        let shared = Arc::new(Shared {
            limits: opts.limits,
            backend,
            auth,
            metrics,
            store,
            transports,
            shutting_down: AtomicBool::new(false),
            healthy: Arc::new(AtomicBool::new(false)),
            connections_active: AtomicUsize::new(0),
            requests_active: AtomicUsize::new(0),
            next_conn_id: AtomicU64::new(1),
            staging,
            quotas,
            watchdog,
            refusals_active: AtomicUsize::new(0),
            refusals: Throttle::new(Duration::from_secs(1)),
            sessions,
            cfg,
        });

        // Bind everything before accepting anything, so a bad URL fails start-up cleanly.
        let mut listeners: Vec<Box<dyn Listener>> = Vec::with_capacity(urls.len());
        for url in &urls {
            let mut l = djinn_transport::listen(url, &opts)
                .map_err(|source| ServerError::Listen { url: url.clone(), source })?;
            // Staged bulk data (a ping's echo, gets through host staging) then needs no
            // registration per request (rdma: registered piece by piece on first use, so start-up
            // and shutdown never wait for the whole pool to be pinned).
            l.register_host_memory(shared.staging.clone())
                .map_err(|source| ServerError::Listen { url: url.clone(), source })?;
            tracing::info!(url = %l.url(), "listening");
            listeners.push(l);
        }
        // Tensors made by remote tensor ops are registered at creation (rdma), not per transfer.
        shared.store.set_registrars(listeners.iter().filter_map(|l| l.host_registrar()).collect());
        let http = match &shared.cfg.metrics_listen {
            Some(addr) => {
                let opts = HttpOptions {
                    conns_max: shared.cfg.http_conns_max,
                    request_timeout: Duration::from_millis(shared.cfg.http_request_timeout_ms),
                };
                let h = HttpEndpoint::start(addr, shared.metrics.clone(), shared.healthy.clone(), opts)?;
                tracing::info!(addr = %h.addr, "serving /healthz and /metrics");
                Some(h)
            }
            None => None,
        };
        let api = match &shared.cfg.http_listen {
            Some(addr) => {
                let a = crate::openai::HttpApi::start(shared.clone(), addr)?;
                tracing::info!(addr = %a.addr, "serving the OpenAI-compatible HTTP API");
                Some(a)
            }
            None => None,
        };
        let mut server = Server { shared: shared.clone(), accepts: Vec::new(), http, api, watchdog: watchdog_thread };
        for mut l in listeners {
            let url = l.url();
            let stop = l.stopper();
            let sh = shared.clone();
            let thread = std::thread::Builder::new()
                .name(format!("djinn-accept-{}", scheme(&url)))
                .spawn(move || accept_loop(&sh, l.as_mut()))
                .map_err(ServerError::Thread)?;
            server.accepts.push(AcceptThread { url, stop, thread: Some(thread) });
        }
        // Models are loaded: healthy once every listener has its accept thread.
        shared.healthy.store(true, Ordering::Release);
        let info = shared.backend.info();
        tracing::info!(node = %shared.cfg.node_id, backend = info.kind, device = %info.name, "server ready");
        Ok(server)
    }

    /// The URLs clients connect to (ports resolved when `:0` was asked for).
    pub fn urls(&self) -> Vec<String> {
        self.accepts.iter().map(|a| a.url.clone()).collect()
    }

    /// The bound address of the HTTP API, if any.
    pub fn http_api_addr(&self) -> Option<String> {
        self.api.as_ref().map(|a| a.addr.clone())
    }

    /// The bound address of the metrics endpoint, if any.
    pub fn metrics_addr(&self) -> Option<String> {
        self.http.as_ref().map(|h| h.addr.clone())
    }

    pub fn shared(&self) -> &Arc<Shared<B>> {
        &self.shared
    }

    /// Blocks until SIGTERM or SIGINT, then drains.
    pub fn run_until_signal(self) -> Result<(), ServerError> {
        let mut signals =
            signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])
                .map_err(ServerError::Signals)?;
        if let Some(sig) = signals.forever().next() {
            tracing::info!(signal = sig, "draining");
        }
        self.shutdown();
        Ok(())
    }

    /// Stops accepting, answers new requests `ShuttingDown`, waits (bounded) for the requests in
    /// progress, and stops the metrics endpoint.
    pub fn shutdown(mut self) {
        let sh = &self.shared;
        sh.healthy.store(false, Ordering::Release);
        sh.shutting_down.store(true, Ordering::Release);
        for a in &self.accepts {
            (a.stop)();
        }
        for a in &mut self.accepts {
            if let Some(t) = a.thread.take() {
                let _ = t.join();
            }
        }
        let deadline = Instant::now() + Duration::from_millis(sh.cfg.drain_timeout_ms);
        // Running generations may finish until the deadline; then they end with `ShuttingDown`
        // and the engine loop stops. Nothing below waits on a client without a bound.
        sh.sessions.shutdown(deadline, DRAIN_GRACE / 2);
        while (sh.requests_active.load(Ordering::Acquire) > 0 || sh.sessions.active() > 0) && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        // Writers hand the last frames (final replies) to clients that still read.
        let flush_until = deadline + DRAIN_GRACE / 4;
        while sh.sessions.outbound_frames() > 0 && Instant::now() < flush_until {
            std::thread::sleep(Duration::from_millis(1));
        }
        let left = sh.requests_active.load(Ordering::Acquire);
        if left > 0 {
            tracing::warn!(requests = left, "drain timeout: exiting with requests still in progress");
        }
        if let Some(h) = &mut self.http {
            h.stop();
        }
        if let Some(a) = &mut self.api {
            a.stop();
        }
        self.watchdog.stop();
        tracing::info!(connections = sh.connections_active.load(Ordering::Relaxed), "drained");
    }
}

/// Sends one error frame on a connection that is about to be dropped (best effort).
fn refuse(conn: &mut Connection, status: Status, message: &str) {
    let meta = djinn_proto::msg::ErrorReply::new(message);
    let mut h = FrameHeader::new(0, FLAG_REPLY, 0, meta.encode_bytes().len() as u32, 0);
    h.status = status.as_u16().into();
    let _ = conn.tx.send(&OutFrame { header: h, meta: meta.encode_bytes(), data: &[] });
}

/// Refuses a client with a typed `Busy`: a short-lived thread (at most [`REFUSALS_MAX`] at once)
/// reads the client's first frame — within `frame_data_timeout_ms` — and answers it, so the client
/// reads the refusal as the reply to its Hello instead of a reset. Past the bound, a bare frame
/// and close.
fn refuse_busy<B: Backend>(sh: &Arc<Shared<B>>, mut conn: Connection, message: String) {
    let taken = sh
        .refusals_active
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < REFUSALS_MAX).then_some(n + 1))
        .is_ok();
    let close = conn.tx.closer();
    let slot = match (taken, close) {
        (true, Some(close)) => {
            let id = sh.next_conn_id.fetch_add(1, Ordering::Relaxed);
            // Not in the handshake phase: a refused client is no slot holder to evict; its
            // first frame must come within the frame-data deadline.
            let clock = sh.watchdog.new_clock();
            clock.enter(Phase::Serving);
            let w = Watched {
                clock,
                close,
                inflight: Arc::new(AtomicUsize::new(0)),
                spin: Arc::new(AtomicBool::new(false)),
            };
            sh.watchdog.register(id, w).ok()
        }
        _ => None,
    };
    let Some(slot) = slot else {
        if taken {
            sh.refusals_active.fetch_sub(1, Ordering::AcqRel);
        }
        refuse(&mut conn, Status::Busy, &message);
        return;
    };
    let sh2 = sh.clone();
    let spawned = std::thread::Builder::new().name("djinn-refuse".into()).spawn(move || {
        if let Ok(head) = conn.rx.recv_head() {
            let h = head.header;
            if conn.rx.skip_data(h.data_len.get()).is_ok() {
                let reply = djinn_proto::msg::ErrorReply::new(&message);
                let meta = reply.encode_bytes();
                let mut r = FrameHeader::new(h.opcode.get(), FLAG_REPLY, h.request_id.get(), meta.len() as u32, 0);
                r.status = Status::Busy.as_u16().into();
                let _ = conn.tx.send(&OutFrame { header: r, meta, data: &[] });
            }
        }
        sh2.watchdog.unregister(slot);
        sh2.refusals_active.fetch_sub(1, Ordering::AcqRel);
    });
    if spawned.is_err() {
        sh.watchdog.unregister(slot);
        sh.refusals_active.fetch_sub(1, Ordering::AcqRel);
    }
}

fn accept_loop<B: Backend>(sh: &Arc<Shared<B>>, l: &mut dyn Listener) {
    let url = l.url();
    loop {
        let mut conn = match l.accept() {
            Ok(c) => c,
            Err(TransportError::Closed) => break,
            Err(e) => {
                // A failed handshake of one client (or EMFILE) must not stop the listener; pause
                // briefly so a persistent error does not spin.
                sh.refusals.warn(|suppressed| tracing::warn!(%url, error = %e, suppressed, "accept failed"));
                sh.metrics.errors_total.with_label_values(&["accept"]).inc();
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        if sh.shutting_down.load(Ordering::Acquire) {
            refuse(&mut conn, Status::ShuttingDown, "server is shutting down");
            break;
        }
        // A flood of connections that never say Hello ages out: the oldest makes way.
        if sh.watchdog.evict_oldest_handshake(sh.cfg.handshakes_pending_max) {
            sh.metrics.errors_total.with_label_values(&["handshake_evicted"]).inc();
        }
        let max = sh.cfg.max_connections;
        // Claim a slot first so concurrent accepts on several listeners cannot overshoot; with
        // every slot taken, one still in its handshake makes way (it ends at once).
        if sh.connections_active.fetch_add(1, Ordering::AcqRel) >= max {
            if sh.watchdog.evict_oldest_handshake(1) {
                sh.metrics.errors_total.with_label_values(&["handshake_evicted"]).inc();
            } else {
                sh.connections_active.fetch_sub(1, Ordering::AcqRel);
                sh.metrics.connections_refused_total.inc();
                sh.refusals.warn(|suppressed| {
                    tracing::warn!(peer = %conn.peer, max, suppressed, "connection refused: max_connections open")
                });
                refuse_busy(sh, conn, format!("server has {max} connections open (max_connections); retry later"));
                continue;
            }
        }
        let id = sh.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let watch = Watch {
            clock: sh.watchdog.new_clock(),
            inflight: Arc::new(AtomicUsize::new(0)),
            spin: Arc::new(AtomicBool::new(true)),
            slot: None,
        };
        // The deadlines run from accept. The registry has room for every slot plus evicted and
        // refused connections, so it is full only if that accounting is broken: refuse rather
        // than serve a connection nobody could time out.
        let watch = match conn.tx.closer() {
            Some(close) => {
                let w = Watched {
                    clock: watch.clock.clone(),
                    close,
                    inflight: watch.inflight.clone(),
                    spin: watch.spin.clone(),
                };
                match sh.watchdog.register(id, w) {
                    Ok(slot) => Watch { slot: Some(slot), ..watch },
                    Err(full) => {
                        sh.connections_active.fetch_sub(1, Ordering::AcqRel);
                        tracing::error!(peer = %conn.peer, error = %full, "connection refused");
                        refuse(&mut conn, Status::Busy, "server cannot track another connection");
                        continue;
                    }
                }
            }
            None => {
                tracing::warn!(peer = %conn.peer, "transport cannot be closed from outside: no deadlines");
                watch
            }
        };
        let slot = watch.slot;
        sh.metrics.connections_active.inc();
        sh.metrics.connections_total.with_label_values(&[conn.transport]).inc();
        let sh2 = sh.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("djinn-conn-{id}"))
            .spawn(move || crate::conn::serve_connection(sh2, id, conn, watch));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a connection thread");
            if let Some(slot) = slot {
                sh.watchdog.unregister(slot);
            }
            sh.connections_active.fetch_sub(1, Ordering::AcqRel);
            sh.metrics.connections_active.dec();
        }
    }
    tracing::info!(%url, "listener closed");
}
