//! Sessions served on the server's models: the models loaded at start-up, the bounded queue of
//! session requests from connection threads, and the engine loop that owns every session and
//! every model's [`djinn_model::Engine`] ([`engine_loop`]), with the engine thread that runs it.
//!
//! Flow: a connection thread parses a session request, wraps it in a [`Job`] with its
//! connection's [`ConnLink`] and pushes it on the queue (`Busy` when `session_queue_max` jobs
//! wait); the engine loop takes the jobs, runs every ready session's work in one batched step
//! per model, and sends replies and token frames itself through the connection's `ReplyTx`.
//!
//! Who runs a turn of the loop ([`Leader`], under the queue's lock): the engine thread while
//! there is work; when the loop is parked (nothing could make progress), the connection thread
//! that queues a request runs that one turn itself (`engine_inline_turns`), so a lone request is
//! answered without waking the engine thread (a futex wake and a context switch, 3–7 µs on a
//! small host: most of a call's fixed overhead). Anything left after that turn (more steps, more
//! input, a deadline to watch, a drain) is handed to the engine thread.
//!
//! Invariants:
//! - Only the loop's leader touches sessions and engines, one turn at a time
//!   ([`SessionService::turns`]); connection threads never block on it: a connection thread
//!   turns only a parked loop, whose lock nobody holds.
//! - A session belongs to the tenant that opened it; another tenant's id is `UnknownSession`.
//! - Every job is answered exactly once (a decode: its token frames, then one final frame), or
//!   dropped unanswered only when its connection is gone. Its [`ActiveGuard`] is held until then,
//!   so drain waits for it and the connection's in-flight count covers it.
//! - When a connection closes its sessions' decodes stop at the next step; the sessions live
//!   `session_lease_s` more (anonymous tenants: none, nobody could attach) and are then closed.

mod chat;
mod engine_loop;
pub(crate) mod outbound;
mod tokenizer_pool;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

use djinn_backend::{Backend, DType};
use djinn_model::{open_model, Engine, EngineOptions, Model};
use djinn_proto::session::{
    LogitsReq, SessionAppendReq, SessionDecodeReq, SessionOpenReq, SessionPrefillReq, SESSION_EOS_IDS_MAX,
};
use djinn_proto::Opcode;

use crate::auth::TenantId;
use crate::config::ServerConfig;
use crate::metrics::Metrics;
use crate::server::ReplyTx;

pub use chat::CONVERSATION_BYTES_MAX;

/// Tokens per KV block of every model.
const BLOCK_TOKENS: usize = 16;
/// Logits rows of one chunk of a `Logits` request (bounds its logits buffer).
const LOGITS_CHUNK_ROWS: usize = 64;
/// KV capacity when none is configured: every session at full length, at most this.
const KV_DEFAULT_MAX_BYTES: usize = 512 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SessionStartError {
    #[error("loading model {name:?}: {source}")]
    Model { name: String, dir: String, source: Box<djinn_model::ModelError> },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("starting the engine loop thread: {0}")]
    Thread(std::io::Error),
}

/// Who takes a connection's queued frames.
pub enum Sink {
    /// The connection's writer thread sends them on its transport.
    Writer(ReplyTx),
    /// The owner pulls them ([`outbound::Outbound::pop`]); called on every push and on close.
    Pull(djinn_transport::ConnectionClose),
}

/// The sending side of one connection as sessions see it: its outbound queue, whether it is open,
/// and how to close it.
pub struct ConnLink {
    pub id: u64,
    pub sink: Sink,
    alive: AtomicBool,
    /// Requests of this connection in progress (the connection's `max_inflight_per_conn`).
    pub inflight: Arc<AtomicUsize>,
    /// Session frames waiting for this connection's writer thread.
    pub out: outbound::Outbound,
    /// Closes the transport from any thread (a stalled connection); `None`: it has no closer.
    closer: Option<djinn_transport::ConnectionClose>,
    /// Wakes the engine loop (the queue drained below its mark, or the connection ended).
    svc: Weak<SessionService>,
}

impl ConnLink {
    pub fn is_alive(&self) -> bool {
        // Acquire pairs with the Release in `mark_closed`.
        self.alive.load(Ordering::Acquire)
    }

    pub fn mark_closed(&self) {
        self.alive.store(false, Ordering::Release);
    }

    /// Closes the connection now (its client stopped reading): the transport is shut, so its
    /// reader and writer threads end and the sessions' leases start.
    pub fn close_now(&self) {
        self.mark_closed();
        self.out.close();
        if let Some(c) = &self.closer {
            c();
        }
    }

    fn kick(&self) {
        if let Some(svc) = self.svc.upgrade() {
            svc.kick();
        }
    }
}

/// Holds a request "in progress" (connection in-flight count and the service's active count)
/// until the job is answered or dropped.
pub struct ActiveGuard {
    counters: [Arc<AtomicUsize>; 2],
}

impl ActiveGuard {
    fn new(counters: [Arc<AtomicUsize>; 2]) -> Self {
        for c in &counters {
            c.fetch_add(1, Ordering::AcqRel);
        }
        ActiveGuard { counters }
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        for c in &self.counters {
            c.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A parsed session request.
pub enum Request {
    Open(SessionOpenReq),
    Attach(u64),
    Prefill(SessionPrefillReq),
    Append(SessionAppendReq),
    Decode(SessionDecodeReq),
    /// A decode whose input is several chat turns (the HTTP front's messages; the request's own
    /// feed is ignored): every turn is recorded, the generation prompt follows the last.
    Chat(SessionDecodeReq, Vec<(String, String)>),
    Cancel(u64),
    Close(u64),
    Logits(LogitsReq),
    /// Breakpoints (`engine_loop::breakpoint`): read (with the connection's empty reply lease,
    /// which the answer is written into and sent from; `None` while its previous read's answer
    /// is still on its way: that answer is copied), write (with the state's bytes, in the
    /// connection's staging chunks), resume.
    HiddenRead(djinn_proto::HiddenReadReq, Option<crate::staging::Staged>),
    HiddenWrite(djinn_proto::HiddenWriteReq, crate::staging::Staged),
    Resume(u64),
}

/// One session request on its way to the engine loop.
pub struct Job {
    pub conn: Arc<ConnLink>,
    pub rid: u64,
    pub opcode: Opcode,
    pub tenant: TenantId,
    pub req: Request,
    pub received: Instant,
    guard: ActiveGuard,
}

/// What a model tells a client at open.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub name: String,
    pub vocab: u32,
    pub max_context_tokens: u32,
    pub eos_ids: Vec<u32>,
    pub has_tokenizer: bool,
    pub has_chat_template: bool,
}

struct Queue {
    jobs: VecDeque<Job>,
    /// A connection closed or a full outbound queue drained since the loop last looked.
    kicked: bool,
    /// Drain: no new jobs; running work may finish until this deadline.
    drain_deadline: Option<Instant>,
    /// Tokenizer results for the loop (at most `tokenize_queue_max` + `tokenize_workers`).
    tokenized: Vec<tokenizer_pool::TokenizeDone>,
    /// Who runs the loop's next turn: only a parked loop costs a producer a futex wake-up, and
    /// only a parked loop may be run by a connection thread.
    leader: Leader,
}

/// Who runs the engine loop's turns (changed under the queue's lock). The loop itself is under
/// [`SessionService::turns`], which only the leader locks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Leader {
    /// The engine thread: turning, or woken to turn.
    Engine,
    /// A connection thread runs one turn for the request it just queued; the engine thread stays
    /// parked, and is handed the loop afterwards if anything is left to do.
    Inline,
    /// Nobody: the engine thread waits on the condvar (with a timeout at the loop's next
    /// deadline).
    Parked,
}

impl Queue {
    /// Something for the loop to look at now. `quiet`: the loop has no work in progress, so a
    /// drain may end.
    fn has_input(&self, quiet: bool) -> bool {
        !self.jobs.is_empty() || !self.tokenized.is_empty() || self.kicked || (quiet && self.drain_deadline.is_some())
    }
}

/// Hands the loop to the engine thread when dropped: armed across an inline turn, so a turn that
/// panics on a connection thread leaves the loop with the engine thread, not with nobody.
struct HandOver<'a>(&'a SessionService);

impl Drop for HandOver<'_> {
    fn drop(&mut self) {
        let q = self.0.queue.lock().unwrap_or_else(|p| p.into_inner());
        self.0.hand_over(q);
    }
}

/// Longest the engine thread parks without a wake-up (a safety net: wake-ups come from the
/// condvar and the loop's deadlines).
const PARK_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// The connection threads' handle on sessions.
pub struct SessionService {
    queue: Mutex<Queue>,
    wake: Condvar,
    queue_max: usize,
    /// Jobs taken and not yet answered or dropped, plus those queued.
    active: Arc<AtomicUsize>,
    models: Vec<ModelInfo>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Set by the engine loop when it has ended (drain waits for it, bounded).
    stopped: Mutex<bool>,
    stopped_cv: Condvar,
    outbound: outbound::OutboundLimits,
    /// The engine loop, locked by whoever runs a turn ([`Leader`]); `None` once it has ended.
    turns: Mutex<Option<Box<dyn engine_loop::Turns>>>,
    /// A connection thread that queues a request while the loop is parked runs the turn itself
    /// (`engine_inline_turns`).
    inline_turns: bool,
    /// `djinn_engine_inline_turns_total`.
    inline_turns_total: prometheus::IntCounter,
}

impl SessionService {
    /// Loads every configured model onto `backend` and starts the engine loop.
    pub fn start<B: Backend>(
        backend: Arc<B>,
        cfg: &ServerConfig,
        metrics: &Metrics,
    ) -> Result<Arc<SessionService>, SessionStartError> {
        let dtype_choice = cfg.model_dtype().map_err(|e| SessionStartError::Config(e.to_string()))?;
        let qos = engine_loop::QosPolicy::from_config(cfg).map_err(SessionStartError::Config)?;
        let mut models = Vec::with_capacity(cfg.models.len());
        // Without --host-swap-mb: a bounded share of the host's memory, split between the models.
        let host_default = djinn_model::host_swap_default_bytes() / cfg.models.len().max(1);
        let mut infos = Vec::with_capacity(cfg.models.len());
        for spec in &cfg.models {
            let t0 = Instant::now();
            let err = |source| SessionStartError::Model {
                name: spec.name.clone(),
                dir: spec.dir.display().to_string(),
                source: Box::new(source),
            };
            let files = open_model(&spec.dir, None).map_err(err)?;
            let dtype = dtype_choice.for_model(&spec.dir, &files.checkpoint);
            let mcfg = files.cfg.clone();
            let weights = djinn_model::WeightLayout::choose_dtype(&files.checkpoint, dtype).ok();
            let kv_dtype = kv_dtype(backend.info().kind, weights);
            let max_ctx =
                cfg.max_context_tokens.unwrap_or(mcfg.max_position_embeddings).min(mcfg.max_position_embeddings).max(1);
            let block_bytes = Model::kv_layout(&mcfg, BLOCK_TOKENS, kv_dtype).block_bytes();
            // One more VMU session than max_sessions: the temporary session of a Logits request.
            let vmu_sessions = cfg.max_sessions + 1;
            let kv_bytes = match cfg.kv_capacity_mb {
                Some(mb) => ServerConfig::mib_bytes(mb),
                None => (vmu_sessions * max_ctx.div_ceil(BLOCK_TOKENS) * block_bytes).min(KV_DEFAULT_MAX_BYTES),
            };
            if kv_bytes < block_bytes {
                return Err(SessionStartError::Config(format!(
                    "kv_capacity_mb: {kv_bytes} bytes hold no KV block of model {:?} ({block_bytes} bytes)",
                    spec.name
                )));
            }
            let host_bytes = match cfg.host_swap_mb {
                Some(mb) => ServerConfig::mib_bytes(mb),
                None => host_default,
            };
            let opts = EngineOptions {
                dtype,
                kv_dtype,
                block_tokens: BLOCK_TOKENS,
                max_context_tokens: Some(max_ctx),
                max_sessions: vmu_sessions,
                max_step_tokens: cfg.max_step_tokens,
                all_logits: true,
                all_logits_rows: Some(LOGITS_CHUNK_ROWS.min(cfg.max_step_tokens)),
                kv_tokens: None,
                kv_capacity_bytes: Some(kv_bytes),
                host_swap_bytes: Some(host_bytes),
                registry: Some(metrics.model_registry(&cfg.node_id, &spec.name)),
            };
            let engine =
                Engine::from_checkpoint(backend.clone(), &files.checkpoint, mcfg.clone(), &opts).map_err(err)?;
            let tok = files.tokenizer.map(Arc::new);
            let mut eos = mcfg.eos_token_ids.clone();
            if let Some(e) = tok.as_ref().and_then(|t| t.eos_id()) {
                if !eos.contains(&e) {
                    eos.push(e);
                }
            }
            eos.truncate(SESSION_EOS_IDS_MAX);
            let info = ModelInfo {
                name: spec.name.clone(),
                vocab: mcfg.vocab_size as u32,
                max_context_tokens: engine.max_context_tokens() as u32,
                eos_ids: eos.clone(),
                has_tokenizer: tok.is_some(),
                has_chat_template: tok.as_ref().is_some_and(|t| t.has_chat_template()),
            };
            let (resident, file) = (engine.model().weights.total_bytes, engine.model().weights.source_bytes);
            metrics.model_weight_bytes.with_label_values(&[spec.name.as_str(), "resident"]).set(resident as i64);
            metrics.model_weight_bytes.with_label_values(&[spec.name.as_str(), "file"]).set(file as i64);
            tracing::info!(
                model = %spec.name, dir = %spec.dir.display(), ms = t0.elapsed().as_millis() as u64,
                kv_bytes, host_bytes, weights_resident_bytes = resident, weights_file_bytes = file,
                dtype = %dtype.map_or("stored".to_owned(), |d| format!("{d:?}").to_lowercase()), "model loaded"
            );
            let meters = engine_loop::TokenMeters::new(metrics, &spec.name);
            models.push(engine_loop::LoadedModel { info: info.clone(), engine, tok, eos, meters });
            infos.push(info);
        }
        let svc = Arc::new(SessionService {
            queue: Mutex::new(Queue {
                jobs: VecDeque::with_capacity(cfg.session_queue_max),
                kicked: false,
                drain_deadline: None,
                tokenized: Vec::with_capacity(cfg.tokenize_queue_max + cfg.tokenize_workers.max(1)),
                leader: Leader::Engine,
            }),
            wake: Condvar::new(),
            queue_max: cfg.session_queue_max,
            active: Arc::new(AtomicUsize::new(0)),
            models: infos,
            thread: Mutex::new(None),
            stopped: Mutex::new(false),
            stopped_cv: Condvar::new(),
            outbound: outbound::OutboundLimits {
                frames_max: cfg.conn_outbound_frames_max,
                bytes_max: cfg.conn_outbound_bytes_max,
                // Every in-flight job may add its last token frame and its final frame at once.
                frames_cap: cfg.conn_outbound_frames_max + 2 * cfg.max_inflight_per_conn,
                stall: std::time::Duration::from_millis(cfg.conn_stall_timeout_ms),
                unread_pause: std::time::Duration::from_millis(cfg.conn_unread_pause_ms),
                gauge: metrics.conn_outbound_frames.clone(),
                passed: outbound::OutboundLimits::mark_counters(&metrics.conn_backpressure_total),
            },
            turns: Mutex::new(None),
            inline_turns: cfg.engine_inline_turns,
            inline_turns_total: metrics.engine_inline_turns_total.clone(),
        });
        let pool =
            tokenizer_pool::TokenizerPool::start(cfg.tokenize_workers, cfg.tokenize_queue_max, Arc::downgrade(&svc))
                .map_err(SessionStartError::Thread)?;
        let lp = engine_loop::EngineLoop::new(svc.clone(), models, cfg, qos, metrics.clone(), pool);
        *svc.turns.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(lp));
        let engine_svc = svc.clone();
        let t = std::thread::Builder::new()
            .name("djinn-engine".into())
            .spawn(move || engine_svc.engine_thread())
            .map_err(SessionStartError::Thread)?;
        *svc.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
        Ok(svc)
    }

    /// The session side of a new connection (its replies go through `tx`).
    pub fn link(self: &Arc<Self>, id: u64, tx: ReplyTx, inflight: Arc<AtomicUsize>) -> Arc<ConnLink> {
        let (closer, probe) = {
            let t = tx.lock().unwrap_or_else(|p| p.into_inner());
            (t.closer(), t.unread_probe())
        };
        Arc::new(ConnLink {
            id,
            sink: Sink::Writer(tx),
            alive: AtomicBool::new(true),
            inflight,
            out: outbound::Outbound::new(self.outbound.clone(), probe),
            closer,
            svc: Arc::downgrade(self),
        })
    }

    /// The session side of an in-process front (the HTTP front): frames are pulled by its owner,
    /// and `wake` is called when one is queued or the link is closed from the engine side.
    pub fn link_pull(
        self: &Arc<Self>,
        id: u64,
        wake: djinn_transport::ConnectionClose,
        inflight: Arc<AtomicUsize>,
    ) -> Arc<ConnLink> {
        Arc::new(ConnLink {
            id,
            sink: Sink::Pull(wake.clone()),
            alive: AtomicBool::new(true),
            inflight,
            out: outbound::Outbound::new(self.outbound.clone(), None),
            closer: Some(wake),
            svc: Arc::downgrade(self),
        })
    }

    /// A tokenizer worker's result: queued for the loop, which is woken.
    fn tokenized(&self, done: tokenizer_pool::TokenizeDone) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.tokenized.push(done);
        self.ring(q);
    }

    /// Wakes the engine loop to look at connections again.
    fn kick(&self) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.kicked = true;
        self.ring(q);
    }

    /// Tells the loop that `q` changed (the caller changed it under this lock): a parked loop is
    /// handed to the engine thread, which is woken; a running one takes the change at its next
    /// look, with no futex call (a connection thread's inline turn hands it over when it ends).
    fn ring(&self, q: MutexGuard<'_, Queue>) {
        if q.leader == Leader::Parked {
            self.hand_over(q);
        }
    }

    /// The engine thread: turns while the loop can make progress, parks when it cannot, and
    /// ends with it.
    fn engine_thread(self: Arc<Self>) {
        loop {
            let (deadline, quiet) = {
                let mut g = self.turns.lock().unwrap_or_else(|p| p.into_inner());
                let Some(lp) = g.as_mut() else { return };
                loop {
                    match lp.turn() {
                        engine_loop::Turn::Again => {}
                        engine_loop::Turn::Park { deadline, quiet } => break (deadline, quiet),
                        engine_loop::Turn::Stopped => {
                            *g = None;
                            return;
                        }
                    }
                }
            };
            self.park(deadline, quiet);
        }
    }

    /// The engine thread, leader with the loop released: waits until it is handed the loop
    /// again ([`Self::ring`]) or `deadline` (or the drain's) passes; returns at once when input
    /// is queued already.
    fn park(&self, deadline: Option<Instant>, quiet: bool) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.has_input(quiet) {
            return;
        }
        q.leader = Leader::Parked;
        loop {
            let until = match (deadline, q.drain_deadline) {
                // An inline turn hands the loop over if a deadline is still pending after it:
                // no need to look at the clock meanwhile (nor to spin on a deadline passed).
                _ if q.leader == Leader::Inline => None,
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let wait = until.map_or(PARK_MAX, |d| d.saturating_duration_since(Instant::now()).min(PARK_MAX));
            let (g, timeout) = self.wake.wait_timeout(q, wait).unwrap_or_else(|p| p.into_inner());
            q = g;
            match q.leader {
                // Handed over by `ring` or by an inline turn that left work.
                Leader::Engine => return,
                // A connection thread is turning; it hands the loop over if anything is left.
                Leader::Inline => {}
                Leader::Parked if timeout.timed_out() => {
                    q.leader = Leader::Engine;
                    return;
                }
                Leader::Parked => {}
            }
        }
    }

    /// A connection thread's turn of the loop, for the request it just queued while the loop was
    /// parked (`leader` is [`Leader::Inline`]): its answer goes out without waking the engine
    /// thread. Anything left afterwards (more steps, more input, a deadline to watch) is handed
    /// to the engine thread.
    fn turn_inline(&self) {
        self.inline_turns_total.inc();
        // Should the turn panic, the loop still goes to the engine thread.
        let unwinding = HandOver(self);
        let turn = {
            let mut g = self.turns.lock().unwrap_or_else(|p| p.into_inner());
            match g.as_mut().map(|lp| lp.turn()) {
                Some(engine_loop::Turn::Stopped) => {
                    *g = None;
                    None
                }
                t => t,
            }
        };
        std::mem::forget(unwinding);
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let hand_over = match turn {
            // A deadline or a drain needs the engine thread's clock.
            Some(engine_loop::Turn::Park { deadline, quiet }) => {
                deadline.is_some() || q.drain_deadline.is_some() || q.has_input(quiet)
            }
            // More steps; or the loop ended (the engine thread finds it gone and ends too).
            _ => true,
        };
        if hand_over {
            self.hand_over(q);
        } else {
            q.leader = Leader::Parked;
        }
    }

    /// Gives the loop to the engine thread and wakes it.
    fn hand_over(&self, mut q: MutexGuard<'_, Queue>) {
        q.leader = Leader::Engine;
        drop(q);
        self.wake.notify_one();
    }

    /// Names of the models served, for the capabilities reply.
    pub fn model_names(&self) -> Vec<String> {
        self.models.iter().map(|m| m.name.clone()).collect()
    }

    pub fn models(&self) -> &[ModelInfo] {
        &self.models
    }

    /// Queues a request for the engine loop. On refusal the status to answer with is returned.
    /// `inline`: the caller (a connection's reader thread) may run the loop's turn itself when
    /// the loop is parked, so the request's answer costs no thread wake-up; a caller that serves
    /// other connections from one thread (the HTTP front) passes false.
    pub fn submit(
        &self,
        conn: &Arc<ConnLink>,
        rid: u64,
        opcode: Opcode,
        tenant: TenantId,
        req: Request,
        inline: bool,
    ) -> Result<(), djinn_proto::Status> {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.drain_deadline.is_some() {
            return Err(djinn_proto::Status::ShuttingDown);
        }
        if q.jobs.len() >= self.queue_max {
            return Err(djinn_proto::Status::Busy);
        }
        let guard = ActiveGuard::new([self.active.clone(), conn.inflight.clone()]);
        q.jobs.push_back(Job { conn: conn.clone(), rid, opcode, tenant, req, received: Instant::now(), guard });
        if inline && self.inline_turns && q.leader == Leader::Parked {
            q.leader = Leader::Inline;
            drop(q);
            self.turn_inline();
        } else {
            self.ring(q);
        }
        Ok(())
    }

    /// A connection ended: its running decodes stop and its sessions' leases start.
    pub fn connection_closed(&self, conn: &ConnLink) {
        conn.mark_closed();
        conn.out.close();
        self.kick();
    }

    /// Session requests not yet finished (queued or in the engine loop).
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Drain: refuses new requests at once, lets running work finish until `deadline`, then ends
    /// what is left with `ShuttingDown`. Waits for the engine loop until `deadline` plus
    /// `grace` at most (a step in progress cannot be interrupted); returns whether it ended.
    pub fn shutdown(&self, deadline: Instant, grace: std::time::Duration) -> bool {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.drain_deadline = Some(deadline);
        self.ring(q);
        let mut stopped = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        let until = deadline + grace;
        while !*stopped {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!("drain: the engine loop did not end in time; exiting without it");
                return false;
            }
            stopped = self.stopped_cv.wait_timeout(stopped, left).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
        drop(stopped);
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            // It has returned from its body: the join is immediate.
            let _ = t.join();
        }
        true
    }

    /// Frames queued on every connection (drain lets writers flush them, bounded).
    pub fn outbound_frames(&self) -> i64 {
        self.outbound.gauge.get()
    }

    fn mark_stopped(&self) {
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.stopped_cv.notify_all();
    }
}

/// The KV cache dtype for weights stored as `weights` on a backend of `kind`: f32 on the CPU
/// reference; on a GPU the model's own float dtype (bf16 for bf16 models — f16 would turn
/// values past 65504 into inf, then NaN), bf16 where the weights are not a float type.
fn kv_dtype(kind: &str, weights: Option<DType>) -> DType {
    match weights {
        _ if kind == "cpu" => DType::F32,
        Some(d) if d.is_float() => d,
        _ => DType::BF16,
    }
}

#[cfg(test)]
mod kv_dtype_tests {
    use super::*;

    #[test]
    fn gpu_sessions_keep_the_models_dtype() {
        assert_eq!(kv_dtype("cuda", Some(DType::BF16)), DType::BF16);
        assert_eq!(kv_dtype("cuda", Some(DType::F16)), DType::F16);
        assert_eq!(kv_dtype("cuda", Some(DType::F32)), DType::F32);
        assert_eq!(kv_dtype("cuda", Some(DType::U8)), DType::BF16);
        assert_eq!(kv_dtype("cuda", None), DType::BF16);
        assert_eq!(kv_dtype("cpu", Some(DType::BF16)), DType::F32);
    }
}
