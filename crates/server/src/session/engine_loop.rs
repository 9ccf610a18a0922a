//! The engine loop: one thread per device owning every session and every model's engine.
//!
//! Each iteration: take the queued jobs (open, prefill, decode, ... answered at once or turned
//! into session work), end the work of closed connections and cancelled decodes, close sessions
//! whose lease ran out, then for each model run ONE batched `Engine::step_sample` over every ready
//! session's work in FCFS order — a decode step (one token) or a prefill chunk — within the step's
//! token budget and the KV memory that fits now (`Engine::batch_fits`; sessions that do not fit
//! wait their turn, idle ones are swapped out by the VMU, LRU). After the step it sends the token
//! frames and replies itself. It parks on the queue's condvar only when no session has work.
//!
//! Session token invariant: `tokens` holds every token of the session; the KV cache holds
//! `tokens[..kv]`. At rest `tokens.len() - kv ≤ 1`: the last token stays pending until a decode
//! step feeds it and samples the next, so prefill never needs logits and a decode's first step
//! computes the prompt's last position (time to first token = one step).
//!
//! The loop never sends on a connection: frames go to the connection's bounded outbound queue
//! ([`super::outbound`]), drained by its own writer thread. A decode whose connection's queue is
//! full is not stepped (paused; its KV stays and may be swapped out) until the writer drains it;
//! a queue full with nothing sent for `conn_stall_timeout_ms` closes that connection, and its
//! sessions keep their lease. Drain: no new jobs; running work may finish until the deadline,
//! then what is left ends with `ShuttingDown`.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use djinn_backend::{Backend, SampleParams};
use djinn_model::{Detokenizer, Engine, ModelError, StopStrings, TextTokenizer};
use djinn_proto::msg::ErrorReply;
use djinn_proto::session::{
    DecodeFeed, FinishWire, LogitsReply, LogitsWire, PrefillInput, PrefillReply, SessionDecodeReply, SessionDecodeReq,
    SessionInfoReply, SessionToken,
};
use djinn_proto::{FrameHeader, Meta, MetaWriter, Opcode, Status, FLAG_REPLY};
use djinn_vmu::VmuError;

use super::chat::Conversation;
use super::outbound::Outbound;
use super::{ActiveGuard, ConnLink, Job, ModelInfo, Request, SessionService};
use crate::auth::TenantId;
use crate::config::ServerConfig;
use crate::metrics::Metrics;

/// Longest the loop parks without a wake-up (a safety net: wake-ups come from the condvar).
const PARK_MAX: Duration = Duration::from_secs(1);

pub(crate) struct LoadedModel<B: Backend> {
    pub info: ModelInfo,
    pub engine: Engine<B>,
    pub tok: Option<TextTokenizer>,
    pub eos: Vec<u32>,
}

/// Where a job's answer goes; holds the job "in progress" until dropped.
struct Answer {
    conn: Arc<ConnLink>,
    rid: u64,
    opcode: Opcode,
    received: Instant,
    _guard: ActiveGuard,
}

impl Answer {
    fn from_job(job: Job) -> (Answer, Request, TenantId) {
        let Job { conn, rid, opcode, tenant, req, received, guard } = job;
        (Answer { conn, rid, opcode, received, _guard: guard }, req, tenant)
    }

    /// Queues the frame for the connection's writer (never blocks on the peer); returns its
    /// wire bytes, 0 when the connection is gone.
    fn send(&self, opcode: Opcode, status: Status, meta: &[u8], data: &[&[u8]]) -> usize {
        if !self.conn.is_alive() {
            return 0;
        }
        let data_len: u64 = data.iter().map(|d| d.len() as u64).sum();
        let mut header = FrameHeader::new(opcode.as_u16(), FLAG_REPLY, self.rid, meta.len() as u32, data_len);
        header.status = status.as_u16().into();
        let n = header.frame_len() as usize;
        match Outbound::push(&self.conn, header, meta, data) {
            Ok(()) => n,
            Err(e) => {
                // Past the hard bound the client has long stopped reading: give up on it (its
                // sessions keep their lease).
                tracing::debug!(conn = self.conn.id, error = ?e, "session frame not queued; closing the connection");
                self.conn.close_now();
                0
            }
        }
    }

    fn ok(self, meta: &[u8], data: &[&[u8]]) {
        self.send(self.opcode, Status::Ok, meta, data);
    }

    fn err(self, status: Status, message: impl Into<String>) {
        let msg = ErrorReply::new(message);
        self.send(self.opcode, status, msg.encode_bytes(), &[]);
    }
}

/// A running decode.
struct DecodeState {
    ans: Answer,
    /// Tokens the decode's own input added, and the session's length before it (undone when the
    /// decode fails before anything of it was fed).
    prompt_tokens: u32,
    base: usize,
    /// The input was a chat turn (recorded in the conversation).
    turn: bool,
    params: SampleParams,
    max_new: u32,
    produced: u32,
    ignore_eos: bool,
    logits: LogitsWire,
    detok: Detokenizer,
    stops: StopStrings,
    last: Instant,
}

enum Work {
    Idle,
    /// Feeding `tokens[kv..len-1]`; `base` = length before the request (undo on failure).
    Feed {
        ans: Answer,
        added: u32,
        base: usize,
    },
    Decode(Box<DecodeState>),
}

struct Session {
    tenant: TenantId,
    model: usize,
    vs: djinn_vmu::SessionId,
    max_tokens: usize,
    tokens: Vec<u32>,
    kv: usize,
    conv: Conversation,
    /// Every connection that opened, attached to or made a request on the session and is still
    /// open (at most one entry per connection): the session's lease starts only when all are gone.
    conns: Vec<Arc<ConnLink>>,
    detached_at: Option<Instant>,
    work: Work,
    cancel: bool,
}

impl Session {
    fn has_work(&self) -> bool {
        !matches!(self.work, Work::Idle)
    }

    /// Whether whoever waits for the current work can still hear of it.
    fn work_heard(&self) -> bool {
        match &self.work {
            Work::Idle => true,
            Work::Feed { ans, .. } => ans.conn.is_alive(),
            Work::Decode(d) => d.ans.conn.is_alive(),
        }
    }
}

/// Why a job was refused.
struct Refusal(Status, String);

impl Refusal {
    fn new(status: Status, msg: impl Into<String>) -> Self {
        Refusal(status, msg.into())
    }
}

fn model_status(e: &ModelError) -> Status {
    match e {
        ModelError::TokenId { .. } | ModelError::TooLong { .. } | ModelError::Batch(_) => Status::BadArgument,
        ModelError::Vmu(VmuError::KvExhausted { .. } | VmuError::AdmissionRefused { .. }) => Status::OutOfMemory,
        ModelError::Vmu(VmuError::TooManySessions { .. }) => Status::LimitExceeded,
        ModelError::Tokenizer { .. } | ModelError::Template(_) | ModelError::NoTokenizer { .. } => Status::BadArgument,
        _ => Status::Internal,
    }
}

pub(crate) struct EngineLoop<B: Backend> {
    svc: Arc<SessionService>,
    models: Vec<LoadedModel<B>>,
    sessions: HashMap<u64, Session>,
    /// Sessions with work, in arrival order of that work (FCFS).
    order: VecDeque<u64>,
    max_sessions: usize,
    /// Sessions skipped by this iteration's steps because their connection's queue is full.
    paused: usize,
    lease: Duration,
    frame_bytes_max: u64,
    metrics: Metrics,
    ids_key: std::collections::hash_map::RandomState,
    ids_next: u64,
    // Per-step buffers, reused (capacity set at start-up).
    batch: Vec<(u64, usize)>,
    fit: Vec<(djinn_vmu::SessionId, usize)>,
    params: Vec<SampleParams>,
    meta: Vec<u8>,
    sampled: Vec<u32>,
    logits: Vec<f32>,
}

impl<B: Backend> EngineLoop<B> {
    pub(crate) fn new(
        svc: Arc<SessionService>,
        models: Vec<LoadedModel<B>>,
        cfg: &ServerConfig,
        metrics: Metrics,
    ) -> Self {
        EngineLoop {
            svc,
            models,
            sessions: HashMap::with_capacity(cfg.max_sessions),
            order: VecDeque::with_capacity(cfg.max_sessions),
            max_sessions: cfg.max_sessions,
            paused: 0,
            lease: Duration::from_secs(cfg.session_lease_s),
            frame_bytes_max: cfg.frame_bytes_max,
            metrics,
            ids_key: std::collections::hash_map::RandomState::new(),
            ids_next: 1,
            batch: Vec::with_capacity(cfg.max_sessions),
            fit: Vec::with_capacity(cfg.max_sessions),
            params: Vec::with_capacity(cfg.max_sessions),
            meta: Vec::with_capacity(256),
            sampled: Vec::with_capacity(cfg.max_sessions),
            logits: Vec::new(),
        }
    }

    pub(crate) fn run(mut self) {
        // Swapped with the queue's own deque each iteration: no allocation per step.
        let mut jobs = VecDeque::with_capacity(self.svc.queue_max);
        let mut progressed = true;
        loop {
            let drain = self.take_jobs(&mut jobs, !progressed);
            // Jobs queued before the drain began were accepted: they are served like the rest.
            while let Some(job) = jobs.pop_front() {
                self.handle(job);
            }
            self.sweep();
            if let Some(deadline) = drain {
                if self.order.is_empty() || Instant::now() >= deadline {
                    self.drain();
                    self.svc.mark_stopped();
                    return;
                }
            }
            progressed = false;
            self.paused = 0;
            for m in 0..self.models.len() {
                progressed |= self.step_model(m);
            }
            self.publish();
        }
    }

    /// Takes every queued job into `into` (empty); parks first when no session can make
    /// progress (none has work, or all wait for their connections to drain). Returns the drain
    /// deadline once the server drains.
    fn take_jobs(&mut self, into: &mut VecDeque<Job>, stalled: bool) -> Option<Instant> {
        let idle = self.order.is_empty() || stalled;
        let deadline = self.next_deadline();
        let mut q = self.svc.queue.lock().unwrap_or_else(|p| p.into_inner());
        let drained = q.drain_deadline.is_some() && self.order.is_empty();
        if idle && q.jobs.is_empty() && !q.kicked && !drained {
            let deadline = match (deadline, q.drain_deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let wait = deadline.map_or(PARK_MAX, |d| d.saturating_duration_since(Instant::now()).min(PARK_MAX));
            q = self.svc.wake.wait_timeout(q, wait).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
        q.kicked = false;
        std::mem::swap(&mut q.jobs, into);
        q.drain_deadline
    }

    /// The next time the loop must look without a wake-up: a lease ends, or a paused
    /// connection counts as stalled.
    fn next_deadline(&self) -> Option<Instant> {
        let lease = self.sessions.values().filter_map(|s| s.detached_at.map(|t| t + self.lease));
        let stall = self.sessions.values().filter_map(|s| match &s.work {
            Work::Decode(d) => d.ans.conn.out.stall_deadline(),
            _ => None,
        });
        lease.chain(stall).min()
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

    // ---- jobs ---------------------------------------------------------------------------------

    fn handle(&mut self, job: Job) {
        let (ans, req, tenant) = Answer::from_job(job);
        let r = match req {
            Request::Open(r) => self.open(ans, tenant, &r.model, r.max_tokens),
            Request::Attach(id) => self.attach(ans, &tenant, id),
            Request::Prefill(r) => self.prefill(ans, &tenant, r.session, r.input),
            Request::Append(r) => self.append(ans, &tenant, r.session, &r.role, &r.text),
            Request::Decode(r) => self.decode(ans, &tenant, r),
            Request::Cancel(id) => self.cancel(ans, &tenant, id),
            Request::Close(id) => self.close(ans, &tenant, id),
            Request::Logits(r) => self.logits(ans, &r.model, &r.ids),
        };
        if let Err((ans, Refusal(status, msg))) = r {
            self.metrics.errors_total.with_label_values(&[status.name()]).inc();
            ans.err(status, msg);
        }
    }

    fn model_index(&self, name: &str) -> Result<usize, Refusal> {
        self.models
            .iter()
            .position(|m| m.info.name == name)
            .ok_or_else(|| Refusal::new(Status::UnknownModel, format!("no model {name:?} on this server")))
    }

    fn open(&mut self, ans: Answer, tenant: TenantId, model: &str, max_tokens: u32) -> Result<(), (Answer, Refusal)> {
        let m = match self.model_index(model) {
            Ok(m) => m,
            Err(r) => return Err((ans, r)),
        };
        if self.sessions.len() >= self.max_sessions {
            let msg = format!("{} sessions are open (max_sessions)", self.max_sessions);
            return Err((ans, Refusal::new(Status::LimitExceeded, msg)));
        }
        let vs = match self.models[m].engine.open_session() {
            Ok(v) => v,
            Err(e) => return Err((ans, Refusal::new(model_status(&e), e.to_string()))),
        };
        let max_ctx = self.models[m].engine.max_context_tokens();
        let max_tokens = if max_tokens == 0 { max_ctx } else { (max_tokens as usize).min(max_ctx) };
        let id = self.new_id();
        self.sessions.insert(
            id,
            Session {
                tenant,
                model: m,
                vs,
                max_tokens,
                tokens: Vec::new(),
                kv: 0,
                conv: Conversation::default(),
                conns: vec![ans.conn.clone()],
                detached_at: None,
                work: Work::Idle,
                cancel: false,
            },
        );
        tracing::debug!(session = id, model, tenant = %self.sessions[&id].tenant, "session open");
        ans.ok(&self.info(id).to_meta(), &[]);
        Ok(())
    }

    fn attach(&mut self, ans: Answer, tenant: &TenantId, id: u64) -> Result<(), (Answer, Refusal)> {
        if let Err(r) = self.lookup(tenant, id, &ans.conn) {
            return Err((ans, r));
        }
        ans.ok(&self.info(id).to_meta(), &[]);
        Ok(())
    }

    /// Checks `new` tokens against the vocabulary and the session's length and adds them (not
    /// fed yet); returns the session's length before them.
    fn add_tokens(&mut self, id: u64, new: &[u32]) -> Result<usize, Refusal> {
        let s = self.sessions.get_mut(&id).expect("caller looked it up");
        let vocab = self.models[s.model].info.vocab;
        if let Some(&bad) = new.iter().find(|&&t| t >= vocab) {
            let msg = format!("token id {bad} is outside the vocabulary of {vocab}");
            return Err(Refusal::new(Status::BadArgument, msg));
        }
        if s.tokens.len() + new.len() > s.max_tokens {
            let msg = format!(
                "prompt too long: {} + {} tokens exceed the session's {} (model limit {})",
                s.tokens.len(),
                new.len(),
                s.max_tokens,
                self.models[s.model].engine.max_context_tokens()
            );
            return Err(Refusal::new(Status::BadArgument, msg));
        }
        let base = s.tokens.len();
        s.tokens.extend_from_slice(new);
        Ok(base)
    }

    /// Adds `new` tokens to the session and starts feeding them (or answers at once when there is
    /// nothing to feed yet: the last token stays pending).
    fn start_feed(&mut self, ans: Answer, id: u64, new: &[u32]) -> Result<(), (Answer, Refusal)> {
        let base = match self.add_tokens(id, new) {
            Ok(b) => b,
            Err(r) => return Err((ans, r)),
        };
        let s = self.sessions.get_mut(&id).expect("caller looked it up");
        if s.tokens.len().saturating_sub(1) <= s.kv {
            let r = PrefillReply { prompt_tokens: new.len() as u32, context_tokens: s.tokens.len() as u32 };
            ans.ok(&r.to_meta(), &[]);
            return Ok(());
        }
        s.work = Work::Feed { ans, added: new.len() as u32, base };
        self.order.push_back(id);
        Ok(())
    }

    /// [`Self::lookup`] of a session that must be idle to take new work (else `Busy`).
    fn lookup_idle(&mut self, tenant: &TenantId, id: u64, conn: &Arc<ConnLink>) -> Result<&mut Session, Refusal> {
        let s = self.lookup(tenant, id, conn)?;
        if s.has_work() {
            return Err(Refusal::new(Status::Busy, "the session is still serving an earlier request"));
        }
        Ok(s)
    }

    fn prefill(
        &mut self,
        ans: Answer,
        tenant: &TenantId,
        id: u64,
        input: PrefillInput,
    ) -> Result<(), (Answer, Refusal)> {
        if let Err(r) = self.lookup_idle(tenant, id, &ans.conn) {
            return Err((ans, r));
        }
        let ids = match input {
            PrefillInput::Ids(ids) => ids,
            PrefillInput::Text(text) => match self.tokenize_raw(id, &text) {
                Ok(ids) => ids,
                Err(r) => return Err((ans, r)),
            },
        };
        self.start_feed(ans, id, &ids)
    }

    /// Raw text (no chat template) as the session's next tokens.
    fn tokenize_raw(&self, id: u64, text: &str) -> Result<Vec<u32>, Refusal> {
        let s = &self.sessions[&id];
        let Some(tok) = self.models[s.model].tok.as_ref() else {
            return Err(Refusal::new(
                Status::BadArgument,
                "this model has no tokenizer: feed token ids instead of text",
            ));
        };
        // The tokenizer's own BOS/EOS post-processing only at the start of a session.
        tok.encode(text, s.tokens.is_empty()).map_err(|e| Refusal::new(Status::BadArgument, e.to_string()))
    }

    /// The tokens one more chat turn feeds; the turn is recorded in the conversation (the caller
    /// pops it if the tokens are refused).
    fn tokenize_turn(&mut self, id: u64, role: &str, text: &str) -> Result<Vec<u32>, Refusal> {
        if role != "user" && role != "system" {
            let msg = format!("role {role:?}: a turn is \"user\" or \"system\"");
            return Err(Refusal::new(Status::BadArgument, msg));
        }
        let s = self.sessions.get_mut(&id).expect("caller looked it up");
        let Some(tok) = self.models[s.model].tok.as_ref().filter(|t| t.has_chat_template()) else {
            let msg = "this model has no tokenizer with a chat template: feed ids or text instead";
            return Err(Refusal::new(Status::BadArgument, msg));
        };
        s.conv.new_turn(tok, &s.tokens, role, text).map_err(|e| Refusal::new(Status::BadArgument, e))
    }

    fn append(
        &mut self,
        ans: Answer,
        tenant: &TenantId,
        id: u64,
        role: &str,
        text: &str,
    ) -> Result<(), (Answer, Refusal)> {
        if let Err(r) = self.lookup_idle(tenant, id, &ans.conn) {
            return Err((ans, r));
        }
        let new = match self.tokenize_turn(id, role, text) {
            Ok(n) => n,
            Err(r) => return Err((ans, r)),
        };
        let r = self.start_feed(ans, id, &new);
        if r.is_err() {
            if let Some(s) = self.sessions.get_mut(&id) {
                s.conv.pop_turn();
            }
        }
        r
    }

    fn decode(&mut self, ans: Answer, tenant: &TenantId, r: SessionDecodeReq) -> Result<(), (Answer, Refusal)> {
        let s = match self.lookup_idle(tenant, r.session, &ans.conn) {
            Ok(s) => s,
            Err(e) => return Err((ans, e)),
        };
        if !(0.0..=1.0).contains(&r.top_p) || r.temperature < 0.0 {
            let msg = format!("temperature {} (≥ 0) / top_p {} (0..=1)", r.temperature, r.top_p);
            return Err((ans, Refusal::new(Status::BadArgument, msg)));
        }
        let (base, max_tokens) = (s.tokens.len(), s.max_tokens);
        let is_turn = matches!(r.feed, DecodeFeed::Turn { .. });
        let new = match &r.feed {
            DecodeFeed::None => Ok(Vec::new()),
            DecodeFeed::Ids(ids) => Ok(ids.clone()),
            DecodeFeed::Text(text) => self.tokenize_raw(r.session, text),
            DecodeFeed::Turn { role, text } => self.tokenize_turn(r.session, role, text),
        };
        // Input with no room to generate after it is refused rather than left unfed: the loop
        // feeds a decode's input only in the step that samples its first token.
        let new = new.and_then(|new| match new.is_empty() || (r.max_new_tokens > 0 && base + new.len() < max_tokens) {
            true => Ok(new),
            false => Err(Refusal::new(
                Status::BadArgument,
                format!(
                    "no token to generate after {} input tokens (max_new_tokens {}, session {base} of {max_tokens}): \
                     feed with SessionPrefill instead",
                    new.len(),
                    r.max_new_tokens
                ),
            )),
        });
        if let Err(e) = new.and_then(|new| self.add_tokens(r.session, &new)) {
            if is_turn {
                // The turn was recorded before its tokens were refused.
                if let Some(s) = self.sessions.get_mut(&r.session) {
                    s.conv.pop_turn();
                }
            }
            return Err((ans, e));
        }
        let s = self.sessions.get_mut(&r.session).expect("looked up above");
        let prompt_tokens = (s.tokens.len() - base) as u32;
        if s.tokens.len() == s.kv {
            if is_turn {
                // A turn that added no token leaves no trace either.
                s.conv.pop_turn();
            }
            let msg = "nothing to decode from: prefill or append input first";
            return Err((ans, Refusal::new(Status::BadArgument, msg)));
        }
        let room = s.max_tokens.saturating_sub(s.tokens.len()) as u32;
        let max_new = r.max_new_tokens.min(room);
        let state = DecodeState {
            prompt_tokens,
            base,
            turn: is_turn,
            params: SampleParams {
                temperature: r.temperature.max(0.0),
                top_k: r.top_k,
                top_p: r.top_p,
                seed: r.seed,
                step: 0,
            },
            max_new,
            produced: 0,
            ignore_eos: r.ignore_eos,
            logits: r.logits,
            detok: Detokenizer::new(),
            stops: StopStrings::new(r.stop),
            last: ans.received,
            ans,
        };
        s.cancel = false;
        if max_new == 0 {
            let reply = SessionDecodeReply {
                tokens: 0,
                finish: FinishWire::Length,
                context_tokens: s.tokens.len() as u32,
                prompt_tokens,
            };
            state.ans.ok(&reply.to_meta(), &[]);
            return Ok(());
        }
        s.work = Work::Decode(Box::new(state));
        self.order.push_back(r.session);
        Ok(())
    }

    fn cancel(&mut self, ans: Answer, tenant: &TenantId, id: u64) -> Result<(), (Answer, Refusal)> {
        let s = match self.lookup(tenant, id, &ans.conn) {
            Ok(s) => s,
            Err(e) => return Err((ans, e)),
        };
        if matches!(s.work, Work::Decode(_)) {
            s.cancel = true;
        }
        ans.ok(&[], &[]);
        Ok(())
    }

    fn close(&mut self, ans: Answer, tenant: &TenantId, id: u64) -> Result<(), (Answer, Refusal)> {
        if let Err(e) = self.lookup(tenant, id, &ans.conn) {
            return Err((ans, e));
        }
        self.close_session(id, FinishWire::Cancelled);
        ans.ok(&[], &[]);
        Ok(())
    }

    fn logits(&mut self, ans: Answer, model: &str, ids: &[u32]) -> Result<(), (Answer, Refusal)> {
        let m = match self.model_index(model) {
            Ok(m) => m,
            Err(r) => return Err((ans, r)),
        };
        let lm = &mut self.models[m];
        let vocab = lm.info.vocab as usize;
        let bytes = ids.len() as u64 * vocab as u64 * 4;
        let bad = if ids.is_empty() {
            Some("no ids".to_owned())
        } else if let Some(&t) = ids.iter().find(|&&t| t as usize >= vocab) {
            Some(format!("token id {t} is outside the vocabulary of {vocab}"))
        } else if ids.len() > lm.engine.max_context_tokens() {
            Some(format!("prompt too long: {} tokens, the model holds {}", ids.len(), lm.engine.max_context_tokens()))
        } else if bytes + 1024 > self.frame_bytes_max {
            Some(format!("{bytes} bytes of logits exceed the frame limit {}", self.frame_bytes_max))
        } else {
            None
        };
        if let Some(msg) = bad {
            return Err((ans, Refusal::new(Status::BadArgument, msg)));
        }
        let r = lm.engine.open_session().and_then(|sid| {
            let r = lm.engine.prefill(sid, ids, true, &mut self.logits);
            let closed = lm.engine.close_session(sid);
            r.and(closed)
        });
        if let Err(e) = r {
            return Err((ans, Refusal::new(model_status(&e), e.to_string())));
        }
        let meta = LogitsReply { rows: ids.len() as u32, vocab: vocab as u32 }.to_meta();
        ans.ok(&meta, &[f32_bytes(&self.logits)]);
        Ok(())
    }

    // ---- session lifetime ---------------------------------------------------------------------

    /// Ends the session's work (a decode gets its final frame with `finish`, a feed `Cancelled`)
    /// and frees its KV.
    fn close_session(&mut self, id: u64, finish: FinishWire) {
        self.end_work(id, Err((Status::Cancelled, "the session was closed")), finish);
        if let Some(s) = self.sessions.remove(&id) {
            if let Err(e) = self.models[s.model].engine.close_session(s.vs) {
                tracing::error!(session = id, error = %e, "closing the session's KV");
            }
            tracing::debug!(session = id, "session closed");
        }
    }

    /// Ends the session's current work: a decode gets its final frame (`finish`) or, with
    /// `Err`, an error; a feed is undone and gets the error.
    fn end_work(&mut self, id: u64, err: Result<(), (Status, &str)>, finish: FinishWire) {
        let Some(s) = self.sessions.get_mut(&id) else { return };
        let work = std::mem::replace(&mut s.work, Work::Idle);
        s.cancel = false;
        match work {
            Work::Idle => return,
            Work::Feed { ans, base, .. } => {
                s.tokens.truncate(base.max(s.kv));
                let (status, msg) = err.err().unwrap_or((Status::Cancelled, "cancelled"));
                ans.err(status, msg);
            }
            Work::Decode(d) => {
                if d.produced == 0 {
                    // Undo what of the decode's own input was not fed (as a feed's undo does); a
                    // chat turn none of which was fed leaves the conversation too.
                    if d.turn && s.kv <= d.base {
                        s.conv.pop_turn();
                    }
                    s.tokens.truncate(d.base.max(s.kv));
                }
                if !s.conv.is_empty() {
                    s.conv.push_assistant(d.stops.text());
                }
                match err {
                    Err((status, msg)) => d.ans.err(status, msg),
                    Ok(()) => {
                        let r = SessionDecodeReply {
                            tokens: d.produced,
                            finish,
                            context_tokens: s.tokens.len() as u32,
                            prompt_tokens: d.prompt_tokens,
                        };
                        d.ans.ok(&r.to_meta(), &[]);
                    }
                }
            }
        }
        self.order.retain(|&o| o != id);
    }

    /// Stops the decodes of closed connections, ends cancelled decodes, starts and ends leases.
    fn sweep(&mut self) {
        let now = Instant::now();
        let mut ended = Vec::new();
        let mut expired = Vec::new();
        for (&id, s) in self.sessions.iter_mut() {
            s.conns.retain(|c| c.is_alive());
            if s.conns.is_empty() && s.detached_at.is_none() {
                s.detached_at = Some(now);
            }
            if let Work::Decode(d) = &s.work {
                if d.ans.conn.out.stalled(now) {
                    // Its client stopped reading: close that connection (its sessions keep
                    // their lease); the engine never waits for it.
                    tracing::info!(conn = d.ans.conn.id, session = id, "connection stalled; closing it");
                    self.metrics.errors_total.with_label_values(&["stalled"]).inc();
                    d.ans.conn.close_now();
                }
            }
            // A decode nobody hears stops; a feed runs to its end (bounded work) so the tokens,
            // the KV and the conversation stay consistent for a later attach.
            let decoding = matches!(s.work, Work::Decode(_));
            if decoding && (s.cancel || !s.work_heard()) {
                ended.push(id);
            }
            if let Some(t) = s.detached_at {
                // An anonymous tenant is its connection: nobody can attach again.
                if s.tenant.is_anonymous() || now.duration_since(t) >= self.lease {
                    expired.push(id);
                }
            }
        }
        for id in ended {
            // A closed connection gets nothing (the send is skipped); a cancel its final frame.
            self.end_work(id, Ok(()), FinishWire::Cancelled);
        }
        for id in expired {
            tracing::debug!(session = id, "lease over: closing");
            self.close_session(id, FinishWire::Cancelled);
        }
    }

    fn drain(&mut self) {
        let ids: Vec<u64> = self.order.iter().copied().collect();
        for id in ids {
            self.end_work(id, Err((Status::ShuttingDown, "server is shutting down")), FinishWire::Cancelled);
        }
        // Jobs queued after the last take are refused too.
        let jobs = std::mem::take(&mut self.svc.queue.lock().unwrap_or_else(|p| p.into_inner()).jobs);
        for job in jobs {
            let (ans, _, _) = Answer::from_job(job);
            ans.err(Status::ShuttingDown, "server is shutting down");
        }
    }

    fn publish(&self) {
        self.metrics.sessions_open.set(self.sessions.len() as i64);
        self.metrics.sessions_paused_backpressure.set(self.paused as i64);
        let swapped: usize = self.models.iter().map(|m| m.engine.vmu().stats().sessions_swapped).sum();
        self.metrics.sessions_swapped.set(swapped as i64);
    }

    // ---- steps --------------------------------------------------------------------------------

    /// Picks this model's batch: FCFS over sessions with work, within the step's token and
    /// sequence budgets and the KV memory that fits now.
    fn form_batch(
        &self,
        m: usize,
        batch: &mut Vec<(u64, usize)>,
        fit: &mut Vec<(djinn_vmu::SessionId, usize)>,
        paused: &mut usize,
    ) -> Option<u64> {
        let eng = &self.models[m].engine;
        let mut tokens_left = eng.max_step_tokens();
        let seqs_max = self.max_sessions;
        batch.clear();
        fit.clear();
        let mut first_refused = None;
        for &id in &self.order {
            let s = &self.sessions[&id];
            if s.model != m || batch.len() >= seqs_max || tokens_left == 0 {
                continue;
            }
            let n = match &s.work {
                Work::Idle => continue,
                // Its client does not read fast enough: not stepped (its KV stays, and may be
                // swapped out) until its queue drains.
                Work::Decode(d) if d.ans.conn.out.is_full() => {
                    *paused += 1;
                    continue;
                }
                Work::Feed { .. } => (s.tokens.len() - 1 - s.kv).min(tokens_left),
                // Everything not fed yet: the decode's own input (chunked by the step's budget),
                // else the one pending token.
                Work::Decode(_) => (s.tokens.len() - s.kv).min(tokens_left),
            };
            fit.push((s.vs, n));
            if !eng.batch_fits(fit) {
                fit.pop();
                first_refused.get_or_insert(id);
                continue;
            }
            batch.push((id, n));
            tokens_left -= n;
        }
        if batch.is_empty() {
            // Not even alone: the memory is committed to sessions that cannot move.
            return first_refused;
        }
        None
    }

    /// Forms and runs one step of model `m`; returns whether anything changed.
    fn step_model(&mut self, m: usize) -> bool {
        let (mut batch, mut fit) = (std::mem::take(&mut self.batch), std::mem::take(&mut self.fit));
        let mut paused = 0;
        let stuck = self.form_batch(m, &mut batch, &mut fit, &mut paused);
        self.paused += paused;
        self.fit = fit;
        let progressed = if let Some(stuck) = stuck {
            let msg = "out of KV memory: device and host swap pool are full";
            self.end_work(stuck, Err((Status::OutOfMemory, msg)), FinishWire::Cancelled);
            true
        } else if !batch.is_empty() {
            self.step_batch(m, &mut batch);
            true
        } else {
            false
        };
        self.batch = batch;
        progressed
    }

    /// Runs one formed batch and hands out its results.
    fn step_batch(&mut self, m: usize, batch: &mut Vec<(u64, usize)>) {
        let mut r = self.run_step(m, batch);
        if r.is_err() && batch.len() > 1 {
            // A failed step changed no session (the engine rolls back every session's growth):
            // retry the oldest alone, so one session's failure does not stop the others.
            batch.truncate(1);
            r = self.run_step(m, batch);
        }
        if let Err(e) = r {
            let id = batch[0].0;
            let status = model_status(&e);
            tracing::warn!(session = id, error = %e, "engine step failed");
            let s = &self.sessions[&id];
            let consistent = self.models[m].engine.session_tokens(s.vs).is_ok_and(|t| t == s.kv);
            self.end_work(id, Err((status, &e.to_string())), FinishWire::Cancelled);
            if !consistent {
                // The KV no longer matches the tokens: the session cannot continue.
                self.close_session(id, FinishWire::Cancelled);
            }
            return;
        }
        self.metrics.engine_steps_total.inc();
        self.metrics.engine_batch_sessions.observe(batch.len() as f64);
        let vocab = self.models[m].info.vocab as usize;
        // Out of `self` while tokens are handed out (they borrow rows of it); put back after.
        let logits = std::mem::take(&mut self.logits);
        for (i, &(id, n)) in batch.iter().enumerate() {
            let s = self.sessions.get_mut(&id).expect("batched sessions exist");
            s.kv += n;
            match &s.work {
                Work::Feed { .. } => {
                    if s.kv + 1 >= s.tokens.len() {
                        let Work::Feed { ans, added, .. } = std::mem::replace(&mut s.work, Work::Idle) else {
                            unreachable!()
                        };
                        let r = PrefillReply { prompt_tokens: added, context_tokens: s.tokens.len() as u32 };
                        ans.ok(&r.to_meta(), &[]);
                        self.order.retain(|&o| o != id);
                    }
                }
                // A chunk of the decode's input that leaves more to feed samples nothing yet.
                Work::Decode(_) if s.kv < s.tokens.len() => {}
                Work::Decode(_) => {
                    let t = self.sampled[i];
                    self.on_token(m, id, t, logits.get(i * vocab..(i + 1) * vocab));
                }
                Work::Idle => {}
            }
        }
        self.logits = logits;
    }

    /// One batched forward over `batch` (session, new tokens) on model `m`.
    fn run_step(&mut self, m: usize, batch: &[(u64, usize)]) -> Result<(), ModelError> {
        let mut seqs = Vec::with_capacity(batch.len());
        let params = &mut self.params;
        params.clear();
        let mut want_logits = false;
        let greedy = SampleParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, step: 0 };
        for &(id, n) in batch {
            let s = &self.sessions[&id];
            seqs.push((s.vs, &s.tokens[s.kv..s.kv + n]));
            params.push(match &s.work {
                Work::Decode(d) => {
                    want_logits |= d.logits != LogitsWire::None;
                    SampleParams { step: d.produced as u64, ..d.params }
                }
                _ => greedy,
            });
        }
        let eng = &mut self.models[m].engine;
        self.logits.clear();
        if want_logits {
            eng.step_sample_logits(&seqs, params, &mut self.sampled, &mut self.logits)
        } else {
            eng.step_sample(&seqs, params, &mut self.sampled)
        }
    }

    /// A decode step of session `id` sampled `t`: emit it, or finish.
    fn on_token(&mut self, m: usize, id: u64, t: u32, logits: Option<&[f32]>) {
        let lm = &self.models[m];
        let s = self.sessions.get_mut(&id).expect("batched sessions exist");
        let Work::Decode(d) = &mut s.work else { return };
        // The sampled token is the session's new pending token, EOS included (a next turn's
        // template usually begins by closing the reply with it).
        s.tokens.push(t);
        if !d.ignore_eos && lm.eos.contains(&t) {
            self.end_work(id, Ok(()), FinishWire::Eos);
            return;
        }
        let index = d.produced;
        d.produced += 1;
        let (emit, hit) = match &lm.tok {
            Some(tok) => match d.detok.push(tok, t) {
                Ok(delta) => d.stops.push(&delta),
                Err(_) => (String::new(), false),
            },
            None => (String::new(), false),
        };
        let mut w = MetaWriter::with_buf(std::mem::take(&mut self.meta));
        let top: Vec<(u32, f32)> = match (d.logits, logits) {
            (LogitsWire::TopK(k), Some(row)) => top_k(row, k as usize),
            _ => Vec::new(),
        };
        let delta = truncate_str(&emit, djinn_proto::session::SESSION_DELTA_BYTES_MAX);
        SessionToken::encode_parts(&mut w, t, index, delta, &top);
        let full: &[&[u8]] = match (d.logits, logits) {
            (LogitsWire::Full, Some(row)) => &[f32_bytes(row)],
            _ => &[],
        };
        let bytes = d.ans.send(Opcode::SessionToken, Status::Ok, w.as_bytes(), full);
        self.meta = w.finish();
        let now = Instant::now();
        if index == 0 {
            self.metrics.ttft_s.observe(now.duration_since(d.ans.received).as_secs_f64());
        } else {
            self.metrics.token_latency_s.observe(now.duration_since(d.last).as_secs_f64());
        }
        d.last = now;
        self.metrics.tokens_generated_total.inc();
        self.metrics.step_bytes.observe(bytes as f64);
        let finish = if hit {
            Some(FinishWire::Stop)
        } else if d.produced >= d.max_new || s.tokens.len() >= s.max_tokens {
            Some(FinishWire::Length)
        } else {
            None
        };
        if let Some(f) = finish {
            self.end_work(id, Ok(()), f);
        }
    }
}

/// The `k` largest logits, largest first.
fn top_k(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<(u32, f32)> = row.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
    let k = k.min(idx.len());
    let cmp = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
    if k < idx.len() {
        idx.select_nth_unstable_by(k, cmp);
        idx.truncate(k);
    }
    idx.sort_by(cmp);
    idx
}

fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    &s[..cut]
}

fn f32_bytes(xs: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte is a valid u8; the slice covers exactly the same
    // memory (alignment of u8 is 1) and borrows `xs` for its lifetime. Little-endian hosts only
    // (the wire is little-endian; every supported target is).
    unsafe { std::slice::from_raw_parts(xs.as_ptr().cast::<u8>(), std::mem::size_of_val(xs)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_sorted_and_bounded() {
        let row = [0.5, 3.0, -1.0, 2.0, 3.0];
        let t = top_k(&row, 3);
        assert_eq!(t.len(), 3);
        assert_eq!(t[0].1, 3.0);
        assert_eq!(t[2], (3, 2.0));
        assert_eq!(top_k(&row, 10).len(), 5);
        assert_eq!(truncate_str("héllo", 2), "h");
    }
}
