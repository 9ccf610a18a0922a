//! Jobs: each request taken from the queue is answered at once (open, attach, cancel, close,
//! logits) or becomes the session's work (prefill, append, decode), checked before it is accepted.

use super::*;

impl<B: Backend> EngineLoop<B> {
    // ---- jobs ---------------------------------------------------------------------------------

    pub(super) fn handle(&mut self, job: Job) {
        let (ans, req, tenant) = Answer::from_job(job, &mut self.request_meters);
        let session = match &req {
            Request::Prefill(r) => Some(r.session),
            Request::Append(r) => Some(r.session),
            Request::Decode(r) => Some(r.session),
            _ => None,
        };
        let r = match req {
            Request::Open(r) => self.open(ans, tenant, &r.model, r.max_tokens, Class::of(r.qos, r.deadline_ms)),
            Request::Attach(id) => self.attach(ans, &tenant, id),
            Request::Prefill(r) => self.prefill(ans, &tenant, r.session, r.input, r.breakpoints),
            Request::Append(r) => self.append(ans, &tenant, r.session, r.role, r.text),
            Request::Decode(r) => self.decode(ans, &tenant, Box::new(r), None),
            Request::Chat(r, turns) => self.decode(ans, &tenant, Box::new(r), Some(turns)),
            Request::Cancel(id) => self.cancel(ans, &tenant, id),
            Request::Close(id) => self.close(ans, &tenant, id),
            Request::Logits(r) => self.logits(ans, &r.model, r.ids),
            Request::HiddenRead(r, reply) => self.hidden_read(ans, &tenant, r, reply),
            Request::HiddenWrite(r, bytes) => self.hidden_write(ans, &tenant, r, bytes),
            Request::Resume(id) => self.resume(ans, &tenant, id),
        };
        self.finish_handling(session, r);
    }

    /// Answers a refusal; a request answered at once (or refused) leaves its session idle: it
    /// keeps the KV charge of what it holds, not of what the request reserved.
    pub(super) fn finish_handling(&mut self, session: Option<u64>, r: Result<(), (Answer, Refusal)>) {
        if let Err((ans, Refusal(status, msg))) = r {
            self.metrics.errors_total.with_label_values(&[status.name()]).inc();
            ans.err(status, msg);
        }
        if let Some(id) = session.filter(|id| self.sessions.get(id).is_some_and(|s| !s.has_work())) {
            self.settle_kv(id);
        }
    }

    pub(super) fn model_index(&self, name: &str) -> Result<usize, Refusal> {
        self.models.iter().position(|m| m.info.name == name).ok_or_else(|| {
            Refusal::new(
                Status::UnknownModel,
                format!("no model {name:?} on this server (`djinn-dataplane models --server URL` lists them)"),
            )
        })
    }

    pub(super) fn open(
        &mut self,
        ans: Answer,
        tenant: TenantId,
        model: &str,
        max_tokens: u32,
        class: Class,
    ) -> Result<(), (Answer, Refusal)> {
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
        let cap = self.kv_capacity_tokens(m);
        if max_tokens > 0 && (max_tokens as usize).min(max_ctx) > cap {
            // Only an explicit length that could never be held is refused.
            let _ = self.models[m].engine.close_session(vs);
            let msg =
                format!("max_tokens {max_tokens}: the model's whole KV capacity holds {cap} tokens (--kv-capacity-mb)");
            return Err((ans, Refusal::new(Status::OutOfMemory, msg)));
        }
        let max_tokens = if max_tokens == 0 { max_ctx } else { (max_tokens as usize).min(max_ctx) };
        let quota = match self.quotas.open_session(&tenant) {
            Ok(t) => t,
            Err(e) => {
                let _ = self.models[m].engine.close_session(vs);
                return Err((ans, Refusal::new(e.status(), e.to_string())));
            }
        };
        // Swap victims by (class, recency): batch sessions go to host memory before interactive
        // ones, realtime last.
        let rank = (Class::Batch as u8) - (class as u8);
        if let Err(e) = self.models[m].engine.set_swap_rank(vs, rank) {
            let _ = self.models[m].engine.close_session(vs);
            return Err((ans, Refusal::new(model_status(&e), e.to_string())));
        }
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
                recomputable: true,
                held: None,
                class,
                since: Instant::now(),
                quota,
            },
        );
        tracing::debug!(session = id, model, tenant = %self.sessions[&id].tenant, "session open");
        ans.ok(&self.info(id).to_meta(), &[]);
        Ok(())
    }

    pub(super) fn attach(&mut self, ans: Answer, tenant: &TenantId, id: u64) -> Result<(), (Answer, Refusal)> {
        if let Err(r) = self.lookup(tenant, id, &ans.conn) {
            return Err((ans, r));
        }
        ans.ok(&self.info(id).to_meta(), &[]);
        Ok(())
    }

    /// Adds `new` tokens to the session and starts feeding them (or answers at once when there is
    /// nothing to feed yet: the last token stays pending).
    pub(super) fn start_feed(&mut self, ans: Answer, id: u64, new: &[u32]) -> Result<(), (Answer, Refusal)> {
        let len = self.sessions[&id].tokens.len() + new.len();
        let base = match self.reserve_kv(id, len).and_then(|()| self.add_tokens(id, new)) {
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
        s.since = Instant::now();
        self.order.push_back(id);
        Ok(())
    }

    /// Charges the session's tenant the KV of `tokens` tokens (whole blocks): what the session
    /// holds plus what the request being accepted may add. Refused with the numbers when the
    /// tenant's `kv_bytes_max` cannot take it; [`Self::settle_kv`] gives back what went unused.
    pub(super) fn reserve_kv(&mut self, id: u64, tokens: usize) -> Result<(), Refusal> {
        let s = self.sessions.get_mut(&id).expect("caller looked it up");
        let bytes = kv_bytes(&self.models[s.model].engine, tokens);
        s.quota.set_kv_bytes(bytes).map_err(|e| Refusal::new(e.status(), e.to_string()))
    }

    /// Resizes the session's KV charge to the tokens it holds (after its request ended).
    pub(super) fn settle_kv(&mut self, id: u64) {
        if let Some(s) = self.sessions.get_mut(&id) {
            let bytes = kv_bytes(&self.models[s.model].engine, s.tokens.len());
            if bytes < s.quota.kv_bytes() {
                s.quota.set_kv_bytes(bytes).expect("shrinking a KV charge always succeeds");
            }
        }
    }

    pub(super) fn prefill(
        &mut self,
        ans: Answer,
        tenant: &TenantId,
        id: u64,
        input: PrefillInput,
        breakpoints: Vec<u32>,
    ) -> Result<(), (Answer, Refusal)> {
        if let Err(r) = self.lookup_idle(tenant, id, &ans.conn) {
            return Err((ans, r));
        }
        match input {
            PrefillInput::Ids(ids) => self.start_prefill(ans, id, &ids, breakpoints),
            PrefillInput::Text(text) => self.tokenize_raw(ans, id, text, Then::Prefill(breakpoints)),
        }
    }

    /// A prefill of `new`: fed as a feed without breakpoints; with them, every token the
    /// session has not fed (the pending one and `new`) in one pass that pauses at each layer
    /// and commits after the last, keeping the last token's state for the next decode
    /// ([`super::breakpoint`]).
    pub(super) fn start_prefill(
        &mut self,
        ans: Answer,
        id: u64,
        new: &[u32],
        layers: Vec<u32>,
    ) -> Result<(), (Answer, Refusal)> {
        if layers.is_empty() {
            return self.start_feed(ans, id, new);
        }
        let m = self.sessions[&id].model;
        let len = self.sessions[&id].tokens.len() + new.len();
        let base = match self.reserve_kv(id, len).and_then(|()| self.add_tokens(id, new)) {
            Ok(b) => b,
            Err(r) => return Err((ans, r)),
        };
        let s = &self.sessions[&id];
        if s.tokens.len() == s.kv {
            // Nothing unfed (no input after a pass that fed everything): nothing to pause in.
            let r = PrefillReply { prompt_tokens: 0, context_tokens: s.tokens.len() as u32 };
            ans.ok(&r.to_meta(), &[]);
            return Ok(());
        }
        let brk = match self.check_breakpoints(m, id, &layers, true) {
            Ok(b) => b,
            Err(e) => {
                self.sessions.get_mut(&id).expect("looked up above").tokens.truncate(base);
                return Err((ans, e));
            }
        };
        let state = DecodeState {
            prompt_tokens: new.len() as u32,
            base,
            turns: 0,
            params: SampleParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, step: 0 },
            max_new: 0,
            produced: 0,
            ignore_eos: false,
            logits: LogitsWire::None,
            detok: Detokenizer::new(),
            stops: StopStrings::new(Vec::new()),
            last: ans.received,
            brk,
            prefill: true,
            ans,
        };
        let s = self.sessions.get_mut(&id).expect("looked up above");
        s.cancel = false;
        s.work = Work::Decode(Box::new(state));
        s.since = Instant::now();
        self.order.push_back(id);
        Ok(())
    }

    pub(super) fn append(
        &mut self,
        ans: Answer,
        tenant: &TenantId,
        id: u64,
        role: String,
        text: String,
    ) -> Result<(), (Answer, Refusal)> {
        if let Err(r) = self.lookup_idle(tenant, id, &ans.conn) {
            return Err((ans, r));
        }
        self.tokenize_turns(ans, id, vec![(role, text)], Then::Append)
    }

    /// A decode: its text input (raw text, a turn, the HTTP front's messages) goes to the
    /// tokenizer pool first; ids go straight on ([`Self::decode_ids`]).
    pub(super) fn decode(
        &mut self,
        ans: Answer,
        tenant: &TenantId,
        mut r: Box<SessionDecodeReq>,
        turns: Option<Vec<(String, String)>>,
    ) -> Result<(), (Answer, Refusal)> {
        if let Err(e) = self.lookup_idle(tenant, r.session, &ans.conn) {
            return Err((ans, e));
        }
        if !(0.0..=1.0).contains(&r.top_p) || r.temperature < 0.0 {
            let msg = format!("temperature {} (≥ 0) / top_p {} (0..=1)", r.temperature, r.top_p);
            return Err((ans, Refusal::new(Status::BadArgument, msg)));
        }
        let id = r.session;
        if let Some(turns) = turns {
            r.feed = DecodeFeed::None;
            return self.tokenize_turns(ans, id, turns, Then::Decode(r));
        }
        match std::mem::take(&mut r.feed) {
            DecodeFeed::Text(text) => self.tokenize_raw(ans, id, text, Then::Decode(r)),
            DecodeFeed::Turn { role, text } => self.tokenize_turns(ans, id, vec![(role, text)], Then::Decode(r)),
            feed => {
                r.feed = feed;
                self.decode_ids(ans, *r, 0)
            }
        }
    }

    /// A decode whose input is ids (or none); `recorded`: chat turns its input recorded in the
    /// conversation (undone if it is refused or none of it is fed).
    pub(super) fn decode_ids(
        &mut self,
        ans: Answer,
        mut r: SessionDecodeReq,
        recorded: usize,
    ) -> Result<(), (Answer, Refusal)> {
        let s = &self.sessions[&r.session];
        let (base, max_tokens, m) = (s.tokens.len(), s.max_tokens, s.model);
        let new: Result<Vec<u32>, Refusal> = match std::mem::take(&mut r.feed) {
            DecodeFeed::Ids(ids) => Ok(ids),
            _ => Ok(Vec::new()),
        };
        // Input with no room to generate after it is refused rather than left unfed: the loop
        // feeds a decode's input only in the step that samples its first token.
        let new = new.and_then(|new| match new.is_empty() || (r.max_new_tokens > 0 && base + new.len() < max_tokens) {
            true => Ok(new),
            false => Err(Refusal::new(
                Status::BadArgument,
                format!(
                    "no room to generate after {} input tokens (max_new_tokens {}, session at {base} of {max_tokens} \
                     tokens): send the input without asking for tokens, or open the session with more tokens",
                    new.len(),
                    r.max_new_tokens
                ),
            )),
        });
        // Refused only when the context, the input and what it may generate cannot fit in the
        // whole KV capacity (anything smaller waits for memory, however busy the server is).
        let cap = self.kv_capacity_tokens(m);
        let new = new.and_then(|new| {
            let ctx = base + new.len();
            let gen = (r.max_new_tokens as usize).min(max_tokens.saturating_sub(ctx));
            if ctx + gen > cap {
                let msg = format!(
                    "{base} context + {} input + {gen} new tokens need {} tokens of KV; the model's whole KV \
                     capacity holds {cap} (--kv-capacity-mb): ask for fewer new tokens or start a new session",
                    new.len(),
                    ctx + gen
                );
                return Err(Refusal::new(Status::OutOfMemory, msg));
            }
            self.reserve_kv(r.session, ctx + gen)?;
            Ok(new)
        });
        if let Err(e) = new.and_then(|new| self.add_tokens(r.session, &new)) {
            // The turns were recorded before their tokens were refused.
            if let Some(s) = self.sessions.get_mut(&r.session) {
                s.conv.pop_turns(recorded);
            }
            return Err((ans, e));
        }
        let brk = match self.check_breakpoints(m, r.session, &r.breakpoints, false) {
            Ok(b) => b,
            Err(e) => {
                let s = self.sessions.get_mut(&r.session).expect("looked up above");
                s.tokens.truncate(base);
                s.conv.pop_turns(recorded);
                return Err((ans, e));
            }
        };
        // Nothing to feed after a prefill's pass that fed every token: the first token comes
        // from the state it held back.
        let brk = match brk {
            None => self.held_start(r.session),
            b => b,
        };
        let s = self.sessions.get_mut(&r.session).expect("looked up above");
        let prompt_tokens = (s.tokens.len() - base) as u32;
        if s.tokens.len() == s.kv && brk.is_none() {
            // A turn that added no token leaves no trace either.
            s.conv.pop_turns(recorded);
            let msg = "nothing to decode from: prefill or append input first";
            return Err((ans, Refusal::new(Status::BadArgument, msg)));
        }
        let room = s.max_tokens.saturating_sub(s.tokens.len()) as u32;
        let max_new = r.max_new_tokens.min(room);
        let state = DecodeState {
            prompt_tokens,
            base,
            turns: recorded,
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
            brk,
            prefill: false,
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
        s.since = Instant::now();
        self.order.push_back(r.session);
        Ok(())
    }

    pub(super) fn cancel(&mut self, ans: Answer, tenant: &TenantId, id: u64) -> Result<(), (Answer, Refusal)> {
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

    pub(super) fn close(&mut self, ans: Answer, tenant: &TenantId, id: u64) -> Result<(), (Answer, Refusal)> {
        if let Err(e) = self.lookup(tenant, id, &ans.conn) {
            return Err((ans, e));
        }
        self.close_session(id, FinishWire::Cancelled);
        ans.ok(&[], &[]);
        Ok(())
    }

    pub(super) fn logits(&mut self, ans: Answer, model: &str, ids: Vec<u32>) -> Result<(), (Answer, Refusal)> {
        let m = match self.model_index(model) {
            Ok(m) => m,
            Err(r) => return Err((ans, r)),
        };
        let lm = &self.models[m];
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
        // Refused only when it cannot fit in the whole KV capacity; anything smaller waits for
        // memory as a session's step does (swap, then preemption: [`super::logits`]).
        let cap = self.kv_capacity_tokens(m);
        if ids.len() > cap {
            let msg = format!(
                "{} tokens of Logits input need {} tokens of KV; the model's whole KV capacity holds {cap} \
                 (--kv-capacity-mb): send fewer ids",
                ids.len(),
                ids.len()
            );
            return Err((ans, Refusal::new(Status::OutOfMemory, msg)));
        }
        if self.logits_jobs.len() >= self.max_sessions {
            let msg = format!("{} Logits requests are waiting (max_sessions): retry later", self.logits_jobs.len());
            return Err((ans, Refusal::new(Status::Busy, msg)));
        }
        self.logits_jobs.push_back(LogitsJob::new(ans, m, ids));
        Ok(())
    }
}
