//! Batch formation: one batch per model per iteration, planned by the scheduler in force — `qos`
//! ([`super::qos`]: decode first, prompts in chunks, classes with shares) or `fcfs` (first come
//! first served within the step's token budget) — within the KV memory that fits now; decodes
//! whose connection cannot take more frames wait (paused). When nothing can run for want of KV,
//! one session is preempted by recomputation ([`super::preempt`]). A failed step changed no
//! session (the engine rolls back), so the first is retried alone.

use super::*;

impl<B: Backend> EngineLoop<B> {
    /// Picks this model's batch with the scheduler in force. Returns the session that cannot
    /// fit even alone (nothing else could be seated).
    pub(super) fn form_batch(
        &mut self,
        m: usize,
        batch: &mut Vec<(u64, usize)>,
        fit: &mut Vec<(djinn_model::SessionId, usize)>,
        paused: &mut usize,
    ) -> Option<u64> {
        match self.qos.scheduler {
            Scheduler::Fcfs => self.form_batch_fcfs(m, batch, fit, paused),
            Scheduler::Qos => self.form_batch_qos(m, batch, fit, paused),
        }
    }

    /// The qos plan ([`QosPolicy::plan`]) over every session of model `m` with work.
    fn form_batch_qos(
        &mut self,
        m: usize,
        batch: &mut Vec<(u64, usize)>,
        fit: &mut Vec<(djinn_model::SessionId, usize)>,
        paused: &mut usize,
    ) -> Option<u64> {
        let now = Instant::now();
        let (mut cands, mut grant) = (std::mem::take(&mut self.cands), std::mem::take(&mut self.grant));
        cands.clear();
        let mut queued = [0i64; 3];
        // Work of other models waits for this step too (a lone prompt's chunk grows only when
        // nothing else waits).
        let mut others = !self.logits_jobs.is_empty();
        for &id in &self.order {
            let s = &self.sessions[&id];
            if s.model != m {
                others |= !matches!(s.work, Work::Idle);
                continue;
            }
            let (need, decode) = match &s.work {
                Work::Idle | Work::Tokenizing(_) => continue,
                // Its input pass runs alone, part by part ([`super::breakpoint`]).
                Work::Decode(d) if d.brk.is_some() => continue,
                Work::Decode(d) if d.ans.conn.out.is_full() => {
                    *paused += 1;
                    continue;
                }
                Work::Feed { .. } => (s.tokens.len() - 1 - s.kv, false),
                Work::Decode(_) => {
                    let left = s.tokens.len() - s.kv;
                    (left, left == 1)
                }
            };
            queued[s.class as usize] += need as i64;
            let class = self.qos.effective(s.class, s.since, now);
            cands.push(Candidate { key: id, class, need, decode, since: s.since });
        }
        batch.clear();
        fit.clear();
        let eng = &self.models[m].engine;
        let sessions = &self.sessions;
        let mut first_refused = None;
        let scratch = &mut self.plan_scratch;
        let alone = !others && cands.len() == 1 && !cands[0].decode;
        let step = eng.max_step_tokens();
        let prefill = self.chunks[m].chunk(alone, step);
        self.qos.plan_chunk(prefill, &mut cands, step, self.max_sessions, &mut grant, scratch, |c, n| {
            let vs = sessions[&c.key].vs;
            let ok = match fit.iter().position(|f| f.0 == vs) {
                Some(p) => {
                    let old = std::mem::replace(&mut fit[p].1, n);
                    let ok = eng.batch_fits(fit);
                    if !ok {
                        fit[p].1 = old;
                    }
                    ok
                }
                None => {
                    fit.push((vs, n));
                    let ok = eng.batch_fits(fit);
                    if !ok {
                        fit.pop();
                    }
                    ok
                }
            };
            if !ok {
                first_refused.get_or_insert(c.key);
            }
            ok
        });
        let mut admitted = [0i64; 3];
        let mut waiting = [0i64; 3];
        for (c, &g) in cands.iter().zip(&grant) {
            let class = self.sessions[&c.key].class as usize;
            if g > 0 {
                batch.push((c.key, g));
                admitted[class] += 1;
            } else {
                waiting[class] += 1;
            }
        }
        for (class, [a, w, q]) in self.sched_gauges[m].iter().enumerate() {
            a.set(admitted[class]);
            w.set(waiting[class]);
            q.set(queued[class]);
        }
        for &(id, _) in batch.iter() {
            if let Some(s) = self.sessions.get_mut(&id) {
                s.since = now;
            }
        }
        self.cands = cands;
        self.grant = grant;
        if batch.is_empty() {
            return first_refused;
        }
        None
    }

    /// Picks this model's batch: FCFS over sessions with work, within the step's token and
    /// sequence budgets and the KV memory that fits now.
    fn form_batch_fcfs(
        &self,
        m: usize,
        batch: &mut Vec<(u64, usize)>,
        fit: &mut Vec<(djinn_model::SessionId, usize)>,
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
                Work::Idle | Work::Tokenizing(_) => continue,
                // Its input pass runs alone, part by part ([`super::breakpoint`]).
                Work::Decode(d) if d.brk.is_some() => continue,
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
    pub(super) fn step_model(&mut self, m: usize) -> bool {
        let (mut batch, mut fit) = (std::mem::take(&mut self.batch), std::mem::take(&mut self.fit));
        let mut paused = 0;
        let stuck = self.form_batch(m, &mut batch, &mut fit, &mut paused);
        self.paused += paused;
        self.fit = fit;
        let progressed = if let Some(stuck) = stuck {
            // Nothing of this model can run: every block is held by sessions that cannot move
            // (the host swap pool is full too). Last resort: preempt one by recomputation, on
            // behalf of the oldest waiting session (whichever the scheduler tried first), so the
            // oldest always makes progress.
            let stuck = self.oldest_waiting(m).unwrap_or(stuck);
            if !self.preempt_for(m, stuck) {
                // Only sessions whose KV cannot be rebuilt hold the memory.
                let st = self.models[m].engine.vmu().stats();
                let msg = format!(
                    "out of KV memory: {} of {} device blocks and {} of {} host swap blocks free, all held by \
                     sessions that can be neither swapped nor recomputed (--kv-capacity-mb, --host-swap-mb)",
                    st.kv_blocks_free, st.kv_blocks_total, st.host_blocks_free, st.host_blocks_total
                );
                tracing::warn!(session = stuck, "{msg}");
                self.end_work(stuck, Err((Status::OutOfMemory, &msg)), FinishWire::Cancelled);
            }
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
    pub(super) fn step_batch(&mut self, m: usize, batch: &mut Vec<(u64, usize)>) {
        let t0 = Instant::now();
        let mut r = self.run_step(m, batch);
        if r.is_ok() {
            // The prefill rate a lone prompt's chunk is sized by (rows of one token count as
            // decodes).
            let decodes = batch.iter().filter(|b| b.1 == 1).count();
            let prompt: usize = batch.iter().map(|b| b.1).sum::<usize>() - decodes;
            self.chunks[m].observe(prompt, decodes, t0.elapsed());
        }
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
                Work::Idle | Work::Tokenizing(_) => {}
            }
        }
        self.logits = logits;
    }

    /// One batched forward over `batch` (session, new tokens) on model `m`.
    pub(super) fn run_step(&mut self, m: usize, batch: &[(u64, usize)]) -> Result<(), ModelError> {
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
}
