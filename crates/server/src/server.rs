//! The server: listeners, accept threads, shared state, start-up and drain.
//!
//! Threads: one accept thread per listener; one reader thread per connection (at most
//! `max_connections`); one HTTP thread for `/healthz` and `/metrics`; one watchdog thread that
//! closes connections which have not completed their Hello within `handshake_timeout_ms`
//! ([`crate::watchdog`]), so silent clients cannot hold connection slots. A connection's replies go
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
use crate::metrics::{HttpEndpoint, HttpError, Metrics};
use crate::session::{SessionService, SessionStartError};
use crate::tensors::Store;
use crate::watchdog::{Watchdog, WatchdogThread};

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
    #[error("starting a thread: {0}")]
    Thread(std::io::Error),
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Sessions(#[from] SessionStartError),
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
    /// Staging bytes connections keep between requests beyond their small default.
    pub staging_retained: AtomicU64,
    /// Handshake deadlines of connections still without a successful Hello.
    pub watchdog: Watchdog,
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
        let store = Store::new(
            backend.clone(),
            cfg.handles_max_per_tenant,
            cfg.tensor_bytes_max_per_tenant,
            cfg.tensor_bytes_max,
            metrics.clone(),
        );
        let (watchdog, watchdog_thread) =
            Watchdog::start(Duration::from_millis(cfg.handshake_timeout_ms), cfg.max_connections, metrics.clone())
                .map_err(ServerError::Thread)?;
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
            staging_retained: AtomicU64::new(0),
            watchdog,
            sessions,
            cfg,
        });

        // Bind everything before accepting anything, so a bad URL fails start-up cleanly.
        let mut listeners: Vec<Box<dyn Listener>> = Vec::with_capacity(urls.len());
        for url in &urls {
            let l = djinn_transport::listen(url, &opts)
                .map_err(|source| ServerError::Listen { url: url.clone(), source })?;
            tracing::info!(url = %l.url(), "listening");
            listeners.push(l);
        }
        let http = match &shared.cfg.metrics_listen {
            Some(addr) => {
                let h = HttpEndpoint::start(addr, shared.metrics.clone(), shared.healthy.clone())?;
                tracing::info!(addr = %h.addr, "serving /healthz and /metrics");
                Some(h)
            }
            None => None,
        };
        let mut server = Server { shared: shared.clone(), accepts: Vec::new(), http, watchdog: watchdog_thread };
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

fn accept_loop<B: Backend>(sh: &Arc<Shared<B>>, l: &mut dyn Listener) {
    let url = l.url();
    loop {
        let mut conn = match l.accept() {
            Ok(c) => c,
            Err(TransportError::Closed) => break,
            Err(e) => {
                // A failed handshake of one client (or EMFILE) must not stop the listener; pause
                // briefly so a persistent error does not spin.
                tracing::warn!(%url, error = %e, "accept failed");
                sh.metrics.errors_total.with_label_values(&["accept"]).inc();
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        if sh.shutting_down.load(Ordering::Acquire) {
            refuse(&mut conn, Status::ShuttingDown, "server is shutting down");
            break;
        }
        let max = sh.cfg.max_connections;
        // Claim a slot first so concurrent accepts on several listeners cannot overshoot.
        if sh.connections_active.fetch_add(1, Ordering::AcqRel) >= max {
            sh.connections_active.fetch_sub(1, Ordering::AcqRel);
            sh.metrics.connections_refused_total.inc();
            tracing::warn!(peer = %conn.peer, max, "connection refused: max_connections open");
            refuse(&mut conn, Status::Busy, &format!("server has {max} connections open (max_connections)"));
            continue;
        }
        let id = sh.next_conn_id.fetch_add(1, Ordering::Relaxed);
        // The handshake deadline runs from accept. The list holds one entry per open connection,
        // so it is full only if the slot accounting above is broken: refuse rather than serve a
        // connection nobody could time out.
        let deadline = match conn.tx.closer().map(|close| sh.watchdog.arm(id, close)) {
            Some(Ok(key)) => Some(key),
            Some(Err(full)) => {
                sh.connections_active.fetch_sub(1, Ordering::AcqRel);
                tracing::error!(peer = %conn.peer, error = %full, "connection refused");
                refuse(&mut conn, Status::Busy, "server cannot track another handshake");
                continue;
            }
            None => {
                tracing::warn!(peer = %conn.peer, "transport cannot be closed from outside: no handshake deadline");
                None
            }
        };
        sh.metrics.connections_active.inc();
        sh.metrics.connections_total.with_label_values(&[conn.transport]).inc();
        let sh2 = sh.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("djinn-conn-{id}"))
            .spawn(move || crate::conn::serve_connection(sh2, id, conn, deadline));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a connection thread");
            if let Some(key) = deadline {
                sh.watchdog.disarm(key);
            }
            sh.connections_active.fetch_sub(1, Ordering::AcqRel);
            sh.metrics.connections_active.dec();
        }
    }
    tracing::info!(%url, "listener closed");
}
