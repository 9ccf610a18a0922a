//! One connection: its reader thread parses requests and answers them in order.
//!
//! Invariants:
//! - Every frame whose header survived validation gets exactly one reply (success or a typed
//!   error), and its bulk data is always consumed (received or skipped), so framing survives
//!   every request-level error. Only transport failures and headers that fail validation (framing
//!   lost) end the connection — after a best-effort error frame for the latter.
//! - Nothing before a successful Hello is served except the Hello itself, and the Hello must come
//!   within `handshake_timeout_ms` of accept. The reader publishes its phase to the watchdog
//!   ([`crate::watchdog`]): a request's bulk data must arrive within `frame_data_timeout_ms` of
//!   its header, and a connection with no request and nothing in flight for
//!   `conn_idle_timeout_ms` is closed. With busy-poll, the receiving half spins only while the
//!   watchdog keeps the connection's spin gate open (work in flight, or a request just ended).
//! - Tensor bytes are not copied on the server where the backend's memory is host-addressable
//!   (CPU): a put receives straight into the new tensor's region, a get sends straight from it.
//!   Otherwise (a GPU without GPUDirect) they pass through host staging, the physical minimum
//!   there: a put in [`PUT_CHUNK_BYTES`] pieces through a pinned buffer (one per connection,
//!   allocated on its first such put), a get through chunks of the staging pool.
//! - Staging memory comes from the server's pool ([`crate::staging`]), one chunk at a time as
//!   data arrives, within the connection's and the tenant's budgets; everything is given back
//!   when the request ends. A refused take is a typed error, the rest of the data is skipped.
//!   A ping of at most [`SMALL_ECHO_BYTES`] echoes from the connection's own buffer instead.
//!   A hidden-state write is received into chunks of the connection's second lease (its
//!   `hand_off`) and handed to the engine loop as [`Staged`]; they go back when the loop has
//!   applied it, and a second write while one is away is answered `Busy`. A hidden-state read
//!   hands the loop the connection's third lease (`reply_off`), which its answer is written into
//!   and sent from (over rdma: registered memory, no allocation or registration per read).
//! - A get whose reply would exceed the frame limit is refused (`FrameTooLarge`) before anything
//!   is sent.
//! - Session requests are parsed here and answered by the engine loop ([`crate::session`]) on
//!   this connection's shared `ReplyTx` (a decode: its token frames, then one final frame); the
//!   reader goes on to the next request at once.
//! - A slow reader only blocks its own reply sends (the transport never buffers without bound),
//!   which stops this connection's reader from taking more requests: backpressure, not growth.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use djinn_backend::{Backend, BackendError, HostBuf};
use djinn_proto::meta::{Meta, MetaError};
use djinn_proto::msg::{
    DeviceInfo, ErrorReply, ExecReply, ExecReq, HelloReply, HelloReq, StatsReply, TensorFreeReq, TensorGetReq,
    TensorPutReply, TensorPutReq,
};
use djinn_proto::{FrameHeader, Opcode, Status, FLAG_REPLY, HEADER_LEN, VERSION};
use djinn_transport::{ByteCounters, Connection, FrameRx, OutFrame, RxHead, TransportError};

use crate::auth::TenantId;
use crate::metrics::ByOpcode;
use crate::quota::Ticket;
use crate::server::{ReplyTx, Shared};
use crate::session::{ConnLink, Request};
use crate::staging::{FillError, HandOff, Lease, Staged, StagingError, CHUNK_BYTES};
use crate::tensors::TensorError;
use crate::watchdog::{ConnClock, Phase, Slot};

/// Bulk data of a staged put moves through pinned staging in pieces of this size.
const PUT_CHUNK_BYTES: usize = 1 << 20;
/// A ping of at most this many bytes echoes from the connection's own buffer, not the staging
/// pool: the latency probe takes no lock and allocates nothing.
const SMALL_ECHO_BYTES: usize = 4096;
/// Oldest protocol version this server still speaks.
const VERSION_MIN: u16 = 1;

/// The connection cannot continue (transport failed or framing lost).
struct Fatal;

/// A request-level failure: answered with this status and message, the connection continues.
struct Reject {
    status: Status,
    message: String,
}

impl Reject {
    fn new(status: Status, message: impl Into<String>) -> Self {
        Reject { status, message: message.into() }
    }
}

impl From<MetaError> for Reject {
    fn from(e: MetaError) -> Self {
        Reject::new(e.status(), e.to_string())
    }
}

impl From<StagingError> for Reject {
    fn from(e: StagingError) -> Self {
        Reject::new(e.status(), e.to_string())
    }
}

impl From<TensorError> for Reject {
    fn from(e: TensorError) -> Self {
        Reject::new(e.status(), e.to_string())
    }
}

/// What a handler produced: either a reply already sent, or a rejection still to send.
enum Outcome {
    Sent,
    Rejected(Reject),
}

/// Metric label of a status (closed set, from the wire enum's names).
fn kind(status: Status) -> &'static str {
    status.name()
}

struct Conn<B: Backend> {
    sh: Arc<Shared<B>>,
    id: u64,
    tx: ReplyTx,
    rx: Box<dyn FrameRx>,
    counters: Arc<ByteCounters>,
    peer: String,
    tenant: Option<TenantId>,
    /// The tenant's connection quota, held from a successful Hello to the end.
    _quota: Option<Ticket>,
    /// What this connection holds of the staging pool (from a successful Hello on).
    staging: Option<Lease>,
    /// The lease a hidden-state write receives into and hands to the engine loop (a sibling of
    /// `staging`, filled at Hello; empty while a write is away).
    hand_off: HandOff,
    /// The lease a hidden-state read's answer is written into by the engine loop and sent from
    /// (a sibling of `staging`, filled at Hello; empty while an answer is on its way).
    reply_off: HandOff,
    /// Pinned staging of [`PUT_CHUNK_BYTES`] for puts to memory that is not host-addressable.
    pinned: Option<B::Host>,
    /// The echo of a ping of at most [`SMALL_ECHO_BYTES`].
    small_echo: Box<[u8]>,
    /// This connection's phase, read by the watchdog's deadlines.
    clock: Arc<ConnClock>,
    /// The busy-poll spin gate: opened here when a request arrives, closed by the watchdog.
    spin: Arc<AtomicBool>,
    /// Requests of this connection in progress (bounded by `max_inflight_per_conn`). The reader
    /// serves in order; session requests hold it until the engine loop answers them.
    inflight: Arc<AtomicUsize>,
    /// This connection as the engine loop sees it (replies, liveness).
    link: Arc<ConnLink>,
    seen_sent: u64,
    seen_received: u64,
    /// This connection's `requests_total` and `request_duration_s` series per opcode (indexed by
    /// its wire value), looked up on first use: a request at line rate does no label hashing.
    op_series: ByOpcode<OpSeries>,
}

/// One opcode's request counter and duration histogram.
type OpSeries = (prometheus::IntCounter, prometheus::Histogram);

/// What the accept path set up for a connection's deadlines (see [`crate::watchdog`]).
pub(crate) struct Watch {
    pub clock: Arc<ConnClock>,
    pub inflight: Arc<AtomicUsize>,
    pub spin: Arc<AtomicBool>,
    /// The registration, `None` where the transport cannot be closed from outside.
    pub slot: Option<Slot>,
}

/// Serves one connection until it closes; runs on the connection's own thread.
pub(crate) fn serve_connection<B: Backend>(sh: Arc<Shared<B>>, id: u64, conn: Connection, watch: Watch) {
    let Connection { tx, mut rx, counters, transport, peer } = conn;
    tracing::debug!(conn = id, %peer, transport, "connection open");
    rx.set_spin_gate(watch.spin.clone());
    let tx: ReplyTx = Arc::new(Mutex::new(tx));
    let Watch { clock, inflight, spin, slot } = watch;
    let mut c = Conn {
        sh: sh.clone(),
        id,
        link: sh.sessions.link(id, tx.clone(), inflight.clone()),
        tx,
        rx,
        counters,
        peer,
        tenant: None,
        _quota: None,
        staging: None,
        hand_off: Arc::new(Mutex::new(None)),
        reply_off: Arc::new(Mutex::new(None)),
        pinned: None,
        small_echo: vec![0u8; SMALL_ECHO_BYTES].into_boxed_slice(),
        clock,
        spin,
        inflight,
        seen_sent: 0,
        seen_received: 0,
        op_series: ByOpcode::new(),
    };
    c.run();
    // Running decodes stop at their next step; the sessions' leases start.
    sh.sessions.connection_closed(&c.link);
    if let Some(slot) = slot {
        sh.watchdog.unregister(slot);
    }
    c.flush_counters();
    c.staging = None;
    if let Some(t) = c.tenant.take() {
        if t.is_anonymous() {
            // An anonymous tenant is this connection: what it created dies with it.
            sh.store.drop_tenant(&t);
        }
    }
    sh.connections_active.fetch_sub(1, Ordering::AcqRel);
    sh.metrics.connections_active.dec();
    tracing::debug!(conn = id, peer = %c.peer, "connection closed");
}

impl<B: Backend> Conn<B> {
    fn run(&mut self) {
        // The clock is read twice per request: when its header is in and when it ends. The phase
        // changes reuse those reads (a read costs microseconds where the clocksource is emulated).
        let mut ended = Instant::now();
        loop {
            if self.tenant.is_some() {
                self.clock.enter_at(Phase::Waiting, ended);
            }
            let (head, t0) = match self.rx.recv_head() {
                Ok(h) => {
                    let t0 = Instant::now();
                    if self.tenant.is_some() {
                        let with_data = h.header.data_len.get() > 0;
                        self.clock.enter_at(if with_data { Phase::Serving } else { Phase::Busy }, t0);
                        self.spin.store(true, Ordering::Relaxed);
                    }
                    (h, t0)
                }
                Err(TransportError::Closed) => return,
                Err(TransportError::BadHeader(e)) => {
                    // Framing is lost: say why (request id unknown → 0), then close this
                    // connection alone.
                    let status = Status::from(e);
                    self.sh.metrics.errors_total.with_label_values(&[kind(status)]).inc();
                    tracing::debug!(conn = self.id, peer = %self.peer, error = %e, "bad header; closing");
                    let _ = self.send_error(0, 0, status, &e.to_string());
                    return;
                }
                Err(e) => {
                    self.sh.metrics.errors_total.with_label_values(&["transport"]).inc();
                    tracing::debug!(conn = self.id, peer = %self.peer, error = %e, "transport error; closing");
                    return;
                }
            };
            self.sh.requests_active.fetch_add(1, Ordering::AcqRel);
            let r = self.handle(head, t0);
            self.sh.requests_active.fetch_sub(1, Ordering::AcqRel);
            if let Some(l) = self.staging.as_mut() {
                l.release();
            }
            self.flush_counters();
            match r {
                Ok(at) => ended = at,
                Err(Fatal) => return,
            }
        }
    }

    fn flush_counters(&mut self) {
        let (s, r) = (self.counters.sent(), self.counters.received());
        self.sh.metrics.bytes_sent_total.inc_by(s.saturating_sub(self.seen_sent));
        self.sh.metrics.bytes_received_total.inc_by(r.saturating_sub(self.seen_received));
        self.seen_sent = s;
        self.seen_received = r;
    }

    /// The opcode's series.
    fn op_series(&mut self, op: Opcode) -> &OpSeries {
        let m = &self.sh.metrics;
        self.op_series.get(op, |label| {
            (m.requests_total.with_label_values(&[label]), m.request_duration_s.with_label_values(&[label]))
        })
    }

    /// Serves one request; returns when it ended (the clock read its duration took).
    fn handle(&mut self, head: RxHead, t0: Instant) -> Result<Instant, Fatal> {
        let h = head.header;
        let rid = h.request_id.get();
        let op_raw = h.opcode.get();
        let data_len = h.data_len.get();
        let opcode = match Opcode::try_from(op_raw) {
            Ok(op) => op,
            Err(e) => {
                self.sh.metrics.requests_total.with_label_values(&["unknown"]).inc();
                self.rx_skip(data_len)?;
                return self.finish(
                    op_raw,
                    rid,
                    None,
                    t0,
                    Outcome::Rejected(Reject::new(Status::UnknownOpcode, e.to_string())),
                );
            }
        };
        self.op_series(opcode).0.inc();

        let precheck = if h.flags.get() & FLAG_REPLY != 0 {
            Some(Reject::new(Status::BadFrame, "a client may not send reply frames"))
        } else if self.sh.shutting_down.load(Ordering::Acquire) {
            Some(Reject::new(Status::ShuttingDown, "server is shutting down"))
        } else if self.tenant.is_none() && opcode != Opcode::Hello {
            Some(Reject::new(Status::Unauthorized, "the first request on a connection must be Hello"))
        } else if self.inflight.load(Ordering::Acquire) >= self.sh.cfg.max_inflight_per_conn {
            Some(Reject::new(Status::Busy, "too many requests in flight on this connection"))
        } else {
            None
        };
        if let Some(rej) = precheck {
            self.rx_skip(data_len)?;
            return self.finish(op_raw, rid, Some(opcode), t0, Outcome::Rejected(rej));
        }

        self.inflight.fetch_add(1, Ordering::AcqRel);
        let outcome = self.dispatch(opcode, &head, t0);
        self.inflight.fetch_sub(1, Ordering::AcqRel);
        let outcome = outcome?;
        let close_after = opcode == Opcode::Hello && self.tenant.is_none();
        let ended = self.finish(op_raw, rid, Some(opcode), t0, outcome)?;
        if close_after {
            // Failed handshake: one try per connection, so tokens cannot be guessed at line rate.
            return Err(Fatal);
        }
        Ok(ended)
    }

    /// Sends a rejection if there is one and records the request's duration; returns when the
    /// request ended. `opcode` is `None` for an opcode this server does not know (`unknown`).
    fn finish(
        &mut self,
        op_raw: u16,
        rid: u64,
        opcode: Option<Opcode>,
        t0: Instant,
        outcome: Outcome,
    ) -> Result<Instant, Fatal> {
        let label = opcode.map_or("unknown", Opcode::name);
        // A queued session request logs its line when the engine loop answers it; the others here,
        // at debug level (pings and tensor ops run at line rate).
        let status = match &outcome {
            Outcome::Rejected(rej) => rej.status.name(),
            Outcome::Sent => "Ok",
        };
        let queued = status == "Ok" && (label.starts_with("Session") || label == "Logits");
        if !queued && tracing::enabled!(target: "djinn::request", tracing::Level::DEBUG) {
            let tenant = self.tenant.as_ref().map(|t| t.to_string());
            let tenant = tenant.as_deref().unwrap_or("-");
            let duration_us = t0.elapsed().as_micros() as u64;
            let (model, opcode, tokens) = ("-", label, 0);
            tracing::debug!(target: "djinn::request", tenant, model, opcode, tokens, duration_us, status, "request");
        }
        if let Outcome::Rejected(rej) = outcome {
            self.sh.metrics.errors_total.with_label_values(&[kind(rej.status)]).inc();
            tracing::debug!(conn = self.id, opcode = label, status = rej.status.name(), msg = %rej.message, "request rejected");
            self.send_error(op_raw, rid, rej.status, &rej.message)?;
        }
        let ended = Instant::now();
        let took_s = ended.saturating_duration_since(t0).as_secs_f64();
        match opcode {
            Some(op) => self.op_series(op).1.observe(took_s),
            None => self.sh.metrics.request_duration_s.with_label_values(&[label]).observe(took_s),
        }
        Ok(ended)
    }

    fn dispatch(&mut self, opcode: Opcode, head: &RxHead, t0: Instant) -> Result<Outcome, Fatal> {
        let h = &head.header;
        let data_len = h.data_len.get();
        // Opcodes that carry no bulk data: any data is a protocol error, consumed to keep framing.
        let takes_data = matches!(opcode, Opcode::Ping | Opcode::TensorPut | Opcode::SessionHiddenWrite);
        if !takes_data && data_len > 0 {
            self.rx_skip(data_len)?;
            return Ok(Outcome::Rejected(Reject::new(
                Status::BadFrame,
                format!("{} carries no bulk data, got {data_len} bytes", opcode.name()),
            )));
        }
        match opcode {
            Opcode::Hello => self.hello(head, t0),
            Opcode::Ping => self.ping(head, t0),
            Opcode::Stats => self.stats(head, t0),
            Opcode::TensorPut => self.tensor_put(head),
            Opcode::TensorGet => self.tensor_get(head),
            Opcode::TensorFree => self.tensor_free(head, t0),
            Opcode::Exec => self.exec(head),
            Opcode::SessionOpen
            | Opcode::SessionAttach
            | Opcode::SessionPrefill
            | Opcode::SessionAppend
            | Opcode::SessionDecode
            | Opcode::SessionCancel
            | Opcode::SessionClose
            | Opcode::Logits => Ok(self.session(opcode, head)),
            Opcode::SessionHiddenRead | Opcode::SessionResume => Ok(self.session(opcode, head)),
            Opcode::SessionHiddenWrite => self.hidden_write(head),
            other => {
                self.rx_skip(data_len)?;
                Ok(Outcome::Rejected(Reject::new(
                    Status::Unsupported,
                    format!("{} is a server-to-client frame", other.name()),
                )))
            }
        }
    }

    /// Receives a SessionHiddenWrite: its state's bytes (checked against its description first,
    /// then received in pieces as they arrive, within the frame limit) go to the engine loop.
    fn hidden_write(&mut self, head: &RxHead) -> Result<Outcome, Fatal> {
        let data_len = head.header.data_len.get();
        let req = match djinn_proto::HiddenWriteReq::from_meta(&head.meta).and_then(|r| {
            r.check_data(data_len)?;
            Ok(r)
        }) {
            Ok(r) => r,
            Err(e) => {
                self.rx_skip(data_len)?;
                return Ok(Outcome::Rejected(e.into()));
            }
        };
        let n = usize::try_from(data_len).map_err(|_| Fatal)?;
        let taken = self.hand_off.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(mut lease) = taken else {
            self.rx_skip(data_len)?;
            let msg = "this connection's previous hidden-state write is still being applied; retry once it is answered";
            return Ok(Outcome::Rejected(Reject::new(Status::Busy, msg)));
        };
        // Into pool chunks as the data arrives: registered memory over rdma, nothing allocated.
        if let Some(reject) = self.recv_into_lease(&mut lease, n)? {
            lease.release();
            *self.hand_off.lock().unwrap_or_else(|p| p.into_inner()) = Some(lease);
            return Ok(Outcome::Rejected(reject));
        }
        let bytes = Staged::new(lease, n, self.hand_off.clone());
        Ok(self.submit_session(Opcode::SessionHiddenWrite, head, Request::HiddenWrite(req, bytes)))
    }

    /// Parses a session request and hands it to the engine loop, which answers it.
    fn session(&mut self, opcode: Opcode, head: &RxHead) -> Outcome {
        use djinn_proto::session::*;
        let m = &head.meta[..];
        let parsed = match opcode {
            Opcode::SessionOpen => SessionOpenReq::from_meta(m).map(Request::Open),
            Opcode::SessionAttach => SessionReq::from_meta(m).map(|r| Request::Attach(r.session)),
            Opcode::SessionPrefill => SessionPrefillReq::from_meta(m).map(Request::Prefill),
            Opcode::SessionAppend => SessionAppendReq::from_meta(m).map(Request::Append),
            Opcode::SessionDecode => SessionDecodeReq::from_meta(m).map(Request::Decode),
            Opcode::SessionCancel => SessionReq::from_meta(m).map(|r| Request::Cancel(r.session)),
            Opcode::SessionClose => SessionReq::from_meta(m).map(|r| Request::Close(r.session)),
            Opcode::SessionResume => SessionReq::from_meta(m).map(|r| Request::Resume(r.session)),
            Opcode::SessionHiddenRead => djinn_proto::HiddenReadReq::from_meta(m).map(|r| {
                // The answer is written into the connection's reply lease and sent from it.
                let lease = self.reply_off.lock().unwrap_or_else(|p| p.into_inner()).take();
                Request::HiddenRead(r, lease.map(|l| Staged::new(l, 0, self.reply_off.clone())))
            }),
            _ => LogitsReq::from_meta(m).map(Request::Logits),
        };
        let req = match parsed {
            Ok(r) => r,
            Err(e) => return Outcome::Rejected(e.into()),
        };
        self.submit_session(opcode, head, req)
    }

    /// Hands a parsed session request to the engine loop.
    fn submit_session(&mut self, opcode: Opcode, head: &RxHead, req: Request) -> Outcome {
        let Some(tenant) = self.tenant.clone() else {
            return Outcome::Rejected(Reject::new(Status::Unauthorized, "no Hello on this connection"));
        };
        match self.sh.sessions.submit(&self.link, head.header.request_id.get(), opcode, tenant, req, true) {
            Ok(()) => Outcome::Sent,
            Err(status) => {
                Outcome::Rejected(Reject::new(status, "the session queue is full or the server is draining"))
            }
        }
    }

    // ---- handlers -----------------------------------------------------------------------------

    fn hello(&mut self, head: &RxHead, t0: Instant) -> Result<Outcome, Fatal> {
        if self.tenant.is_some() {
            return Ok(Outcome::Rejected(Reject::new(Status::BadArgument, "this connection already said Hello")));
        }
        let req = match HelloReq::from_meta(&head.meta) {
            Ok(r) => r,
            Err(e) => return Ok(Outcome::Rejected(e.into())),
        };
        let Some(version) = req.negotiate(VERSION_MIN, VERSION) else {
            return Ok(Outcome::Rejected(Reject::new(
                Status::BadVersion,
                format!(
                    "client speaks versions {}..={}, this server {VERSION_MIN}..={VERSION}",
                    req.version_min, req.version_max
                ),
            )));
        };
        let (tenant, tenant_id) = if self.sh.auth.required() {
            match self.sh.auth.authenticate(&req.token) {
                Some(name) => (TenantId::Named(name.to_owned()), fnv1a(name.as_bytes())),
                None => {
                    self.sh.refusals.warn(|suppressed| {
                        tracing::warn!(conn = self.id, peer = %self.peer, suppressed, "handshake with a bad token")
                    });
                    return Ok(Outcome::Rejected(Reject::new(Status::Unauthorized, "token not accepted")));
                }
            }
        } else {
            (TenantId::Connection(self.id), self.id)
        };
        let ticket = match self.sh.quotas.connect(&tenant) {
            Ok(t) => t,
            Err(e) => {
                self.sh.metrics.connections_refused_total.inc();
                self.sh.refusals.warn(|suppressed| {
                    tracing::warn!(conn = self.id, peer = %self.peer, error = %e, suppressed, "handshake refused")
                });
                return Ok(Outcome::Rejected(Reject::new(e.status(), e.to_string())));
            }
        };
        tracing::debug!(conn = self.id, %tenant, client = %req.client_name, version, "handshake");
        // Out of the handshake before the reply goes out, so no later accept evicts it as silent.
        self.clock.enter(Phase::Busy);
        let lease = self.sh.staging.lease(&tenant);
        *self.hand_off.lock().unwrap_or_else(|p| p.into_inner()) = Some(lease.sibling());
        *self.reply_off.lock().unwrap_or_else(|p| p.into_inner()) = Some(lease.sibling());
        self.staging = Some(lease);
        self._quota = Some(ticket);
        self.tenant = Some(tenant);
        let info = self.sh.backend.info();
        let reply = HelloReply {
            version,
            tenant_id,
            frame_bytes_max: self.sh.limits.frame_bytes_max,
            meta_bytes_max: self.sh.limits.meta_bytes_max,
            backend: info.kind.to_owned(),
            devices: vec![DeviceInfo { name: info.name, memory_bytes: info.memory_total_bytes }],
            models: self.sh.sessions.model_names(),
            transports: self.sh.transports.clone(),
        };
        let meta = reply.to_meta();
        self.send_ok(head, &meta, &[], Some(t0))?;
        Ok(Outcome::Sent)
    }

    fn ping(&mut self, head: &RxHead, t0: Instant) -> Result<Outcome, Fatal> {
        let n = head.header.data_len.get();
        if n == 0 {
            self.send_ok(head, &[], &[], Some(t0))?;
            return Ok(Outcome::Sent);
        }
        if n <= SMALL_ECHO_BYTES as u64 {
            let echo = &mut self.small_echo[..n as usize];
            if let Err(e) = self.rx.recv_data(echo) {
                return Err(self.transport_failed(e));
            }
            self.clock.enter(Phase::Busy);
            self.send_ok(head, &[], &[&self.small_echo[..n as usize]], None)?;
            return Ok(Outcome::Sent);
        }
        // The echo is held whole: taken from the pool chunk by chunk as the data arrives.
        let mut lease = self.staging.take().ok_or(Fatal)?;
        let r = self.ping_staged(head, &mut lease, n);
        lease.release();
        self.staging = Some(lease);
        r
    }

    fn ping_staged(&mut self, head: &RxHead, lease: &mut Lease, n: u64) -> Result<Outcome, Fatal> {
        let max = self.sh.cfg.staging_bytes_max_per_conn;
        if n > max {
            self.rx_skip(n)?;
            return Ok(Outcome::Rejected(StagingError::ConnBudget { max }.into()));
        }
        let n = usize::try_from(n).map_err(|_| Fatal)?;
        if let Some(reject) = self.recv_into_lease(lease, n)? {
            return Ok(Outcome::Rejected(reject));
        }
        // The data is in; sending the echo is bounded by the transport's backpressure.
        self.clock.enter(Phase::Busy);
        self.send_ok(head, &[], &lease.slices(n), None)?;
        Ok(Outcome::Sent)
    }

    /// Receives the frame's `n` data bytes into `lease`'s chunks as they arrive (registered
    /// memory over rdma, nothing allocated). A chunk the pool or a budget refuses: the rest of
    /// the data is skipped and the refusal returned (the chunks taken so far stay in `lease`).
    fn recv_into_lease(&mut self, lease: &mut Lease, n: usize) -> Result<Option<Reject>, Fatal> {
        let (rx, clock) = (&mut self.rx, &self.clock);
        let r = lease.fill(n, |at, part| {
            rx.recv_data(part)?;
            // `frame_data_timeout_ms` bounds a stall, not the whole transfer: each chunk that
            // arrives starts it afresh (a 64 MiB ping on a slow link took longer than the
            // deadline and was closed mid-transfer).
            if at + part.len() < n {
                clock.enter(Phase::Serving);
            }
            Ok(())
        });
        match r {
            Ok(()) => Ok(None),
            Err(FillError::Refused { at, error }) => {
                self.rx_skip((n - at) as u64)?;
                Ok(Some(error.into()))
            }
            Err(FillError::Write(e)) => Err(self.transport_failed(e)),
        }
    }

    fn stats(&mut self, head: &RxHead, t0: Instant) -> Result<Outcome, Fatal> {
        // Only this tenant's own counters: other tenants' activity is not its business.
        let tenant = self.tenant.clone().ok_or(Fatal)?;
        let (handles, bytes) = self.sh.store.with_table(&tenant, |tab| (tab.len() as u64, tab.bytes()));
        let reply = StatsReply {
            counters: vec![
                ("connections_active".into(), self.sh.quotas.connections_of(&tenant) as u64),
                ("tensors_live".into(), handles),
                ("tensor_bytes_live".into(), bytes),
                ("tenant_handles".into(), handles),
                ("connection_bytes_received".into(), self.counters.received()),
                ("connection_bytes_sent".into(), self.counters.sent()),
                // rdma: registrations this connection's transfers made (0 when every transfer
                // used memory registered at start-up or at the tensor's creation).
                ("connection_registrations".into(), self.counters.registrations.load(Ordering::Relaxed)),
                ("connection_bytes_received_direct".into(), self.counters.received_direct()),
            ],
        };
        let meta = reply.to_meta();
        self.send_ok(head, &meta, &[], Some(t0))?;
        Ok(Outcome::Sent)
    }

    fn tensor_put(&mut self, head: &RxHead) -> Result<Outcome, Fatal> {
        let data_len = head.header.data_len.get();
        let req = match TensorPutReq::from_meta(&head.meta) {
            Ok(r) => r,
            Err(e) => {
                self.rx_skip(data_len)?;
                return Ok(Outcome::Rejected(e.into()));
            }
        };
        if req.desc.byte_len() != data_len {
            self.rx_skip(data_len)?;
            return Ok(Outcome::Rejected(Reject::new(
                Status::ShapeMismatch,
                format!("tensor {:?} is {} bytes, the frame carries {data_len}", req.desc, req.desc.byte_len()),
            )));
        }
        let tenant = self.tenant.clone().ok_or(Fatal)?;
        let sh = self.sh.clone();
        let store = &sh.store;
        // Quota and memory first, so a refused put never lands a byte.
        let prepared = store.reserve(&tenant, 1, data_len).and_then(|res| Ok((res, store.new_tensor(&req.desc)?)));
        let (res, mut tensor) = match prepared {
            Ok(p) => p,
            Err(e) => {
                self.rx_skip(data_len)?;
                return Ok(Outcome::Rejected(e.into()));
            }
        };
        // data_len was validated against the frame limit, which fits in memory by configuration.
        let n = usize::try_from(data_len).map_err(|_| Fatal)?;
        let write_err = match sh.backend.host_bytes_mut(&mut tensor.region, 0, n) {
            // Host-addressable memory: the transport receives straight into the tensor.
            Some(dst) => {
                self.rx.recv_data(dst).map_err(|e| self.transport_failed(e))?;
                None
            }
            None => self.recv_device(&mut tensor.region, n)?,
        };
        if let Some(rej) = write_err {
            return Ok(Outcome::Rejected(rej));
        }
        let handle = store.insert(res, vec![tensor])[0];
        let meta = TensorPutReply { handle }.to_meta();
        self.send_ok(head, &meta, &[], None)?;
        Ok(Outcome::Sent)
    }

    fn tensor_get(&mut self, head: &RxHead) -> Result<Outcome, Fatal> {
        let req = match TensorGetReq::from_meta(&head.meta) {
            Ok(r) => r,
            Err(e) => return Ok(Outcome::Rejected(e.into())),
        };
        let tenant = self.tenant.clone().ok_or(Fatal)?;
        // Only a reference is taken under the tenant's lock: the bytes move after it is released,
        // so a slow reader never holds up the tenant's other connections, and a concurrent free
        // drops the handle but not the memory being sent.
        let t = match self.sh.store.with_table(&tenant, |tab| tab.get_shared(req.handle)) {
            Ok(t) => t,
            Err(e) => return Ok(Outcome::Rejected(e.into())),
        };
        let meta = t.desc.to_meta();
        let frame_bytes = (HEADER_LEN + meta.len()) as u64 + t.desc.byte_len();
        let frame_max = self.sh.limits.frame_bytes_max;
        if frame_bytes > frame_max {
            return Ok(Outcome::Rejected(Reject::new(
                Status::FrameTooLarge,
                format!(
                    "tensor is {} bytes: its reply frame ({frame_bytes} bytes) exceeds frame_bytes_max {frame_max}; \
                     keep tensors fetched by TensorGet below it or raise it on server and client",
                    t.desc.byte_len()
                ),
            )));
        }
        let Ok(n) = usize::try_from(t.desc.byte_len()) else {
            return Ok(Outcome::Rejected(Reject::new(Status::Internal, "tensor too large for this host")));
        };
        let sh = self.sh.clone();
        // SAFETY: `t` is published, and published tensors are never written (the invariant of
        // `crate::tensors`: only unpublished regions are written), so no write can race the send;
        // the `Arc` keeps the region alive while the slice is borrowed.
        if let Some(bytes) = unsafe { sh.backend.host_bytes(&t.region, 0, n) } {
            // Host-addressable memory: a vectored send straight from the tensor.
            self.send_ok(head, &meta, &[bytes], None)?;
            return Ok(Outcome::Sent);
        }
        // Device memory: read into pool chunks, then one vectored send.
        let mut lease = self.staging.take().ok_or(Fatal)?;
        let mut r = Ok(Outcome::Sent);
        let mut off = 0usize;
        while off < n {
            let len = (n - off).min(CHUNK_BYTES);
            let read = lease.take().map_err(Reject::from).and_then(|buf| {
                sh.backend.read(&t.region, off, &mut buf[..len]).map_err(|e| TensorError::from(e).into())
            });
            if let Err(rej) = read {
                r = Ok(Outcome::Rejected(rej));
                break;
            }
            off += len;
        }
        if off == n {
            r = self.send_ok(head, &meta, &lease.slices(n), None).map(|()| Outcome::Sent);
        }
        lease.release();
        self.staging = Some(lease);
        r
    }

    fn tensor_free(&mut self, head: &RxHead, t0: Instant) -> Result<Outcome, Fatal> {
        let req = match TensorFreeReq::from_meta(&head.meta) {
            Ok(r) => r,
            Err(e) => return Ok(Outcome::Rejected(e.into())),
        };
        let tenant = self.tenant.clone().ok_or(Fatal)?;
        if let Err(e) = self.sh.store.free(&tenant, &req.handles) {
            return Ok(Outcome::Rejected(e.into()));
        }
        self.send_ok(head, &[], &[], Some(t0))?;
        Ok(Outcome::Sent)
    }

    fn exec(&mut self, head: &RxHead) -> Result<Outcome, Fatal> {
        let req = match ExecReq::from_meta(&head.meta) {
            Ok(r) => r,
            Err(e) => return Ok(Outcome::Rejected(e.into())),
        };
        let tenant = self.tenant.clone().ok_or(Fatal)?;
        match crate::exec::exec(&self.sh.store, &tenant, &req, self.sh.cfg.exec_nodes_max) {
            Ok(outputs) => {
                let meta = ExecReply { outputs }.to_meta();
                self.send_ok(head, &meta, &[], None)?;
                Ok(Outcome::Sent)
            }
            Err(e) => Ok(Outcome::Rejected(Reject::new(e.status, e.message))),
        }
    }

    // ---- I/O helpers --------------------------------------------------------------------------

    /// Receives `n` bytes of a put's data into `region` through pinned staging (or, without it, a
    /// chunk of the staging pool), piece by piece (memory that is not host-addressable). Returns
    /// the backend's write failure or the pool's refusal, if any, after consuming all the data so
    /// framing survives.
    /// Receives a tensor into device memory: straight from the NIC where the backend exports the
    /// region as a dma-buf and the transport can register it (GPUDirect RDMA), else staged.
    fn recv_device(&mut self, region: &mut B::Region, n: usize) -> Result<Option<Reject>, Fatal> {
        if let Some(buf) = self.sh.backend.dmabuf(region, 0, n) {
            use std::os::fd::AsFd;
            let dst = djinn_transport::DmaBufDst { fd: buf.fd.as_fd(), offset: buf.offset, len: buf.len };
            // SAFETY: the region is not published yet and is borrowed exclusively here, so no op,
            // copy or reader reaches the exported range while the NIC writes it.
            match unsafe { self.rx.recv_data_dmabuf(&dst) } {
                Ok(true) => return Ok(None),
                Ok(false) => {}
                Err(e) => return Err(self.transport_failed(e)),
            }
        }
        self.recv_staged(region, n)
    }

    fn recv_staged(&mut self, region: &B::Region, n: usize) -> Result<Option<Reject>, Fatal> {
        if n == 0 {
            return Ok(None);
        }
        if self.pinned.is_none() {
            match self.sh.backend.alloc_host(PUT_CHUNK_BYTES) {
                Ok(h) => self.pinned = Some(h),
                // Pageable staging still works, at the cost of the driver's own bounce copy.
                Err(e) => tracing::debug!(conn = self.id, error = %e, "no pinned staging; using pageable memory"),
            }
        }
        let chunk = PUT_CHUNK_BYTES.min(CHUNK_BYTES).min(n);
        let mut pinned = self.pinned.take();
        let mut pageable = self.staging.take().ok_or(Fatal)?;
        let buf: &mut [u8] = match &mut pinned {
            Some(h) => &mut h.as_mut_slice()[..chunk],
            None => match pageable.take() {
                Ok(b) => &mut b[..chunk],
                Err(e) => {
                    self.staging = Some(pageable);
                    self.pinned = pinned;
                    self.rx_skip(n as u64)?;
                    return Ok(Some(e.into()));
                }
            },
        };
        let (mut off, mut write_err, mut r) = (0usize, None, Ok(()));
        while off < n {
            let len = chunk.min(n - off);
            if let Err(e) = self.rx.recv_data(&mut buf[..len]) {
                r = Err(self.transport_failed(e));
                break;
            }
            if write_err.is_none() {
                write_err = self.sh.backend.write(region, off, &buf[..len]).err();
            }
            off += len;
        }
        self.pinned = pinned;
        pageable.release();
        self.staging = Some(pageable);
        r.map(|()| write_err.map(|e: BackendError| TensorError::from(e).into()))
    }

    fn transport_failed(&self, e: TransportError) -> Fatal {
        self.sh.metrics.errors_total.with_label_values(&["transport"]).inc();
        tracing::debug!(conn = self.id, peer = %self.peer, error = %e, "transport error; closing");
        Fatal
    }

    fn rx_skip(&mut self, n: u64) -> Result<(), Fatal> {
        if n == 0 {
            return Ok(());
        }
        self.rx.skip_data(n).map_err(|e| self.transport_failed(e))
    }

    /// Sends a success reply. With `server_time_from`, the time from request received to reply
    /// handed to the transport is recorded as the server's own time.
    fn send_ok(
        &self,
        head: &RxHead,
        meta: &[u8],
        data: &[&[u8]],
        server_time_from: Option<Instant>,
    ) -> Result<(), Fatal> {
        let h = &head.header;
        let data_len: u64 = data.iter().map(|d| d.len() as u64).sum();
        let header = FrameHeader::new(h.opcode.get(), FLAG_REPLY, h.request_id.get(), meta.len() as u32, data_len);
        let mut tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t0) = server_time_from {
            self.sh.metrics.server_time_s.observe(t0.elapsed().as_secs_f64());
        }
        tx.send(&OutFrame { header, meta, data }).map_err(|e| self.transport_failed(e))
    }

    fn send_error(&self, opcode: u16, rid: u64, status: Status, message: &str) -> Result<(), Fatal> {
        let reply = ErrorReply::new(message);
        let meta = reply.encode_bytes();
        let mut header = FrameHeader::new(opcode, FLAG_REPLY, rid, meta.len() as u32, 0);
        header.status = status.as_u16().into();
        let mut tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        tx.send(&OutFrame { header, meta, data: &[] }).map_err(|e| self.transport_failed(e))
    }
}

/// Stable 64-bit id of a tenant name for the capabilities reply (FNV-1a).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}
