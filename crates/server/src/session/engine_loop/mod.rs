//! The engine loop: one per device, owning every session and every model's engine. Its turns
//! ([`Turns`]) run one at a time: on the engine thread, or on the connection thread that queued
//! a request while the loop was parked ([`super::SessionService`] says who holds it when).
//!
//! Modules, one concept each: [`session`] (a session's state and its work), [`answer`] (replies
//! and refusals), [`jobs`] (turning requests into work), [`tokenize`] (input to token ids),
//! [`qos`] (classes and the step policy), [`schedule`] (forming and running a batched step),
//! [`logits`] (`Logits` requests fed in chunks between steps), [`stream`] (token frames),
//! [`lifecycle`] (ending work, leases, drain), [`preempt`] (preemption by recomputation, the last
//! resort for KV memory), [`breakpoint`] (input passes paused at layers). This file holds the
//! loop itself.
//!
//! Each turn: take the queued jobs (open, prefill, decode, ... answered at once or turned
//! into session work), end the work of closed connections and cancelled decodes, close sessions
//! whose lease ran out, then for each model: the next part of any breakpoint pass, ONE batched
//! `Engine::step_sample` over the ready sessions' work as the scheduler plans it (`qos`: decodes
//! first, prompt chunks bounded per step, classes with shares; `fcfs`: arrival order) within the
//! step's token budget and the KV memory that fits now (`Engine::batch_fits`; sessions that do
//! not fit wait their turn, idle ones are swapped out by the VMU, lowest class then LRU; when
//! nothing fits and the host pool is full, one session's KV is dropped and later rebuilt from its
//! tokens), then one chunk of the oldest `Logits` request. After the step it queues the token
//! frames and replies. A turn after which no session can make progress says so
//! ([`Turn::Park`]), and the loop parks until input is queued or its next deadline.
//!
//! Session token invariant: `tokens` holds every token of the session; the KV cache holds
//! `tokens[..kv]`. At rest `tokens.len() - kv ≤ 1`: the last token stays pending until a decode
//! step feeds it and samples the next, so prefill never needs logits and a decode's first step
//! computes the prompt's last position (time to first token = one step).
//!
//! The loop never waits on a connection: a frame is sent directly only when the connection's
//! transport takes it at once, else it goes to the connection's bounded outbound queue
//! ([`super::outbound`]), drained by its own writer thread. A decode whose connection's queue is
//! full is not stepped (paused; its KV stays and may be swapped out) until the writer drains it;
//! a queue full with nothing sent for `conn_stall_timeout_ms` closes that connection, and its
//! sessions keep their lease. Drain: no new jobs; running work may finish until the deadline,
//! then what is left ends with `ShuttingDown`.

mod answer;
mod breakpoint;
mod chunk;
mod jobs;
mod lifecycle;
mod logits;
mod preempt;
mod qos;
mod schedule;
mod session;
mod stream;
mod tokenize;

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use djinn_backend::{Backend, SampleParams};
use djinn_model::VmuError;
use djinn_model::{Detokenizer, Engine, ModelError, StopStrings, TextTokenizer};
use djinn_proto::msg::ErrorReply;
use djinn_proto::session::{
    DecodeFeed, FinishWire, LogitsReply, LogitsWire, PrefillInput, PrefillReply, SessionDecodeReply, SessionDecodeReq,
    SessionInfoReply, SessionToken,
};
use djinn_proto::{FrameHeader, Meta, MetaWriter, Opcode, Status, FLAG_REPLY};

use super::chat::Conversation;
use super::outbound::{Outbound, PushError};
use super::{ActiveGuard, ConnLink, Job, ModelInfo, Request, SessionService};
use crate::auth::TenantId;
use crate::config::ServerConfig;
use crate::metrics::{ByOpcode, Metrics};

pub(crate) use qos::QosPolicy;
pub(crate) use stream::TokenMeters;

use answer::{kv_bytes, model_status, Answer, Refusal};
use logits::LogitsJob;
use qos::{Candidate, Class, Scheduler};
use session::{DecodeState, Session, Work};
use stream::f32_bytes;
use tokenize::{Then, Tokenizing};

/// What one turn of the loop leaves to do (see [`Turns`]).
pub(crate) enum Turn {
    /// Sessions can make progress: turn again at once.
    Again,
    /// Nothing can make progress until new input is queued, or until `deadline` (a lease ends,
    /// a paused connection counts as stalled, a breakpoint's pause runs out). `quiet`: no
    /// session work, `Logits` request or tokenization is in progress (a drain may end now).
    Park { deadline: Option<Instant>, quiet: bool },
    /// The server drained and the loop has ended: drop it.
    Stopped,
}

/// The engine loop as the threads that run its turns see it, whatever the backend: the engine
/// thread, and a connection thread that finds the loop parked when it queues a request
/// ([`super::SessionService::submit`]). One thread at a time (the service keeps it under a
/// lock).
pub(crate) trait Turns: Send {
    fn turn(&mut self) -> Turn;
}

impl<B: Backend> Turns for EngineLoop<B> {
    /// One iteration: take the queued jobs (answered at once or turned into session work), end
    /// the work of closed connections and cancelled decodes, close expired sessions, then for
    /// each model the next part of any breakpoint pass, one batched step, and one chunk of the
    /// oldest `Logits` request.
    fn turn(&mut self) -> Turn {
        // Swapped with the queue's own deque: no allocation per turn.
        let mut jobs = std::mem::take(&mut self.jobs);
        let drain = self.take_jobs(&mut jobs);
        let mut done = std::mem::take(&mut self.tok_done);
        for d in done.drain(..) {
            self.tokenized(d);
        }
        self.tok_done = done;
        // Jobs queued before the drain began were accepted: they are served like the rest.
        while let Some(job) = jobs.pop_front() {
            self.handle(job);
        }
        self.jobs = jobs;
        self.sweep();
        if let Some(deadline) = drain {
            let idle = self.order.is_empty() && self.logits_jobs.is_empty() && self.tokenizing == 0;
            if idle || Instant::now() >= deadline {
                self.drain();
                self.svc.mark_stopped();
                return Turn::Stopped;
            }
        }
        let mut progressed = false;
        self.paused = 0;
        for m in 0..self.models.len() {
            let stepped = self.step_breakpoints(m) | self.step_model(m);
            progressed |= stepped;
            // A Logits request's next chunk between steps: it never holds the loop for more
            // than one chunk.
            progressed |= self.step_logits(m, stepped);
        }
        self.publish();
        let idle = self.order.is_empty() && self.logits_jobs.is_empty();
        if progressed && !idle {
            return Turn::Again;
        }
        // Nothing to step (no work, or all of it waits for its connections to drain): the
        // backends' workers need not keep their cores for a next op, which the connection thread
        // and a client on this host need for the next request.
        for m in &self.models {
            m.engine.backend().quiesce();
        }
        Turn::Park { deadline: self.next_deadline(), quiet: idle && self.tokenizing == 0 }
    }
}

pub(crate) struct LoadedModel<B: Backend> {
    pub info: ModelInfo,
    pub engine: Engine<B>,
    pub tok: Option<Arc<TextTokenizer>>,
    pub eos: Vec<u32>,
    /// This model's per-token series, resolved once ([`stream::TokenMeters`]).
    pub meters: stream::TokenMeters,
}

pub(crate) struct EngineLoop<B: Backend> {
    svc: Arc<SessionService>,
    models: Vec<LoadedModel<B>>,
    sessions: HashMap<u64, Session>,
    /// Sessions with work, in arrival order of that work (FCFS).
    order: VecDeque<u64>,
    /// The step scheduler and its QoS settings.
    qos: QosPolicy,
    /// Per model: the prompt tokens a step may feed ([`chunk::ChunkSizer`]).
    chunks: Vec<chunk::ChunkSizer>,
    /// `Logits` requests, fed a chunk per iteration between steps (the first one holds the
    /// engine's spare session); at most `max_sessions`, more are refused `Busy`.
    logits_jobs: VecDeque<LogitsJob>,
    max_sessions: usize,
    /// Per-tenant quotas, checked where a session is opened.
    quotas: Arc<crate::quota::Quotas>,
    /// Sessions skipped by this iteration's steps because their connection's queue is full.
    paused: usize,
    lease: Duration,
    /// How long a session may stay paused at a breakpoint (`breakpoint_lease_ms`).
    pause_lease: Duration,
    /// Breakpoint passes one batched part runs at most (`breakpoint_part_passes_max`).
    part_passes_max: usize,
    frame_bytes_max: u64,
    metrics: Metrics,
    request_meters: answer::RequestMeters,
    ids_key: std::collections::hash_map::RandomState,
    ids_next: u64,
    // Per-step buffers, reused (capacity set at start-up).
    batch: Vec<(u64, usize)>,
    fit: Vec<(djinn_model::SessionId, usize)>,
    cands: Vec<Candidate>,
    grant: Vec<usize>,
    plan_scratch: Vec<usize>,
    params: Vec<SampleParams>,
    meta: Vec<u8>,
    sampled: Vec<u32>,
    logits: Vec<f32>,
    /// Tokenization off the loop: the pool, jobs out (at most `tokenize_queue_max`), the last
    /// job's ticket, and the results taken from the queue (reused).
    tok_pool: crate::session::tokenizer_pool::TokenizerPool,
    tokenizing: usize,
    tok_ticket: u64,
    tok_done: Vec<crate::session::tokenizer_pool::TokenizeDone>,
    /// The jobs a turn takes, swapped with the queue's own deque (no allocation per turn).
    jobs: VecDeque<Job>,
    /// Per model and class: the admitted, waiting and queued-token gauges, looked up once (a
    /// labelled lookup per gauge per step cost a hash and a lock each).
    sched_gauges: Vec<[[prometheus::IntGauge; 3]; 3]>,
}

impl<B: Backend> EngineLoop<B> {
    pub(crate) fn new(
        svc: Arc<SessionService>,
        models: Vec<LoadedModel<B>>,
        cfg: &ServerConfig,
        qos: QosPolicy,
        metrics: Metrics,
        tok_pool: crate::session::tokenizer_pool::TokenizerPool,
    ) -> Self {
        let sched_gauges = models
            .iter()
            .map(|lm| {
                Class::ALL.map(|class| {
                    let l = [lm.info.name.as_str(), class.name()];
                    [
                        metrics.sched_sessions_admitted.with_label_values(&l),
                        metrics.sched_sessions_waiting.with_label_values(&l),
                        metrics.sched_queued_tokens.with_label_values(&l),
                    ]
                })
            })
            .collect();
        let chunks = models
            .iter()
            .map(|_| {
                chunk::ChunkSizer::new(qos.prefill_chunk_tokens(), Duration::from_millis(cfg.prefill_alone_step_ms))
            })
            .collect();
        EngineLoop {
            svc,
            chunks,
            models,
            sessions: HashMap::with_capacity(cfg.max_sessions),
            order: VecDeque::with_capacity(cfg.max_sessions),
            qos,
            logits_jobs: VecDeque::with_capacity(cfg.max_sessions),
            max_sessions: cfg.max_sessions,
            quotas: crate::quota::Quotas::new(cfg),
            paused: 0,
            lease: Duration::from_secs(cfg.session_lease_s),
            pause_lease: Duration::from_millis(cfg.breakpoint_lease_ms),
            part_passes_max: cfg.breakpoint_part_passes_max,
            frame_bytes_max: cfg.frame_bytes_max,
            request_meters: answer::RequestMeters::new(&metrics),
            metrics,
            ids_key: std::collections::hash_map::RandomState::new(),
            ids_next: 1,
            batch: Vec::with_capacity(cfg.max_sessions),
            fit: Vec::with_capacity(cfg.max_sessions),
            cands: Vec::with_capacity(cfg.max_sessions),
            grant: Vec::with_capacity(cfg.max_sessions),
            plan_scratch: Vec::with_capacity(cfg.max_sessions),
            params: Vec::with_capacity(cfg.max_sessions),
            meta: Vec::with_capacity(256),
            sampled: Vec::with_capacity(cfg.max_sessions),
            logits: Vec::new(),
            tok_done: Vec::with_capacity(tok_pool.queue_max()),
            jobs: VecDeque::with_capacity(cfg.session_queue_max),
            sched_gauges,
            tok_pool,
            tokenizing: 0,
            tok_ticket: 0,
        }
    }

    /// Takes every queued job into `into` (empty). Returns the drain deadline once the server
    /// drains.
    fn take_jobs(&mut self, into: &mut VecDeque<Job>) -> Option<Instant> {
        let mut q = self.svc.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.kicked = false;
        self.metrics.session_queue_depth.set(q.jobs.len() as i64);
        std::mem::swap(&mut q.jobs, into);
        std::mem::swap(&mut q.tokenized, &mut self.tok_done);
        q.drain_deadline
    }

    /// The next time the loop must look without a wake-up: a lease ends, a paused
    /// connection counts as stalled, or a breakpoint's pause runs out.
    fn next_deadline(&self) -> Option<Instant> {
        let lease = self.sessions.values().filter_map(|s| s.detached_at.map(|t| t + self.lease));
        let stall = self.sessions.values().filter_map(|s| match &s.work {
            Work::Decode(d) => d.ans.conn.out.stall_deadline(),
            _ => None,
        });
        lease.chain(stall).chain(self.pause_deadline()).min()
    }

    /// Tokens the whole KV capacity of model `m` holds (every block, one sequence).
    fn kv_capacity_tokens(&self, m: usize) -> usize {
        let e = &self.models[m].engine;
        e.vmu().stats().kv_blocks_total * e.model().block_tokens()
    }

    fn new_id(&mut self) -> u64 {
        loop {
            let mut h = self.ids_key.build_hasher();
            h.write_u64(self.ids_next);
            self.ids_next += 1;
            let id = h.finish();
            if id != 0 && !self.sessions.contains_key(&id) {
                return id;
            }
        }
    }

    /// The tenant's session `id`, now attached to `conn` as well (any request on a session
    /// attaches the connection it came on; the lease starts only when every attached connection
    /// is gone, so no connection's exit closes a session another still uses).
    fn lookup(&mut self, tenant: &TenantId, id: u64, conn: &Arc<ConnLink>) -> Result<&mut Session, Refusal> {
        match self.sessions.get_mut(&id) {
            Some(s) if &s.tenant == tenant => {
                if !s.conns.iter().any(|c| Arc::ptr_eq(c, conn)) {
                    s.conns.retain(|c| c.is_alive());
                    s.conns.push(conn.clone());
                }
                s.detached_at = None;
                Ok(s)
            }
            // Another tenant's session reads exactly like a missing one.
            _ => Err(Refusal::new(Status::UnknownSession, format!("no session {id:#x}"))),
        }
    }

    fn info(&self, id: u64) -> SessionInfoReply {
        let s = &self.sessions[&id];
        let m = &self.models[s.model].info;
        SessionInfoReply {
            session: id,
            context_tokens: s.tokens.len() as u32,
            max_tokens: s.max_tokens as u32,
            vocab: m.vocab,
            eos_ids: m.eos_ids.clone(),
            has_tokenizer: m.has_tokenizer,
            has_chat_template: m.has_chat_template,
        }
    }

    /// [`Self::lookup`] of a session that must be idle to take new work (else `Busy`).
    fn lookup_idle(&mut self, tenant: &TenantId, id: u64, conn: &Arc<ConnLink>) -> Result<&mut Session, Refusal> {
        let s = self.lookup(tenant, id, conn)?;
        if s.has_work() {
            return Err(Refusal::new(Status::Busy, "the session is still serving an earlier request"));
        }
        Ok(s)
    }
}
