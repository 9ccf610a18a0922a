//! A session's lifetime: ending its work (final frame or error, undoing unfed input), closing it,
//! the sweep (cancelled and unheard decodes, stalled connections, leases), drain, and the gauges.

use super::*;

impl<B: Backend> EngineLoop<B> {
    /// Ends the session's work (a decode gets its final frame with `finish`, a feed `Cancelled`)
    /// and frees its KV.
    pub(super) fn close_session(&mut self, id: u64, finish: FinishWire) {
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
    pub(super) fn end_work(&mut self, id: u64, err: Result<(), (Status, &str)>, finish: FinishWire) {
        let Some(s) = self.sessions.get_mut(&id) else { return };
        let work = std::mem::replace(&mut s.work, Work::Idle);
        if let Work::Decode(d) = &work {
            // A pass stopped at a breakpoint is rolled back: the session is as before the request.
            if d.brk.as_ref().is_some_and(|b| b.started()) {
                if let Err(e) = self.models[s.model].engine.cancel_pass(s.vs) {
                    tracing::error!(session = id, error = %e, "rolling back a paused pass");
                }
            }
        }
        s.cancel = false;
        match work {
            Work::Idle => return,
            Work::Tokenizing(mut t) => {
                // Answered now; the session stays busy until the job (and the conversation with
                // it) is back.
                if let Some(ans) = t.ans.take() {
                    let (status, msg) = err.err().unwrap_or((Status::Cancelled, "cancelled"));
                    ans.err(status, msg);
                }
                s.work = Work::Tokenizing(t);
                return;
            }
            Work::Feed { ans, base, .. } => {
                s.tokens.truncate(base.max(s.kv));
                let (status, msg) = err.err().unwrap_or((Status::Cancelled, "cancelled"));
                ans.err(status, msg);
            }
            Work::Decode(d) => {
                if d.produced == 0 {
                    // Undo what of the decode's own input was not fed (as a feed's undo does); a
                    // chat turn none of which was fed leaves the conversation too.
                    if d.turns > 0 && s.kv <= d.base {
                        s.conv.pop_turns(d.turns);
                    }
                    s.tokens.truncate(d.base.max(s.kv));
                }
                if !s.conv.is_empty() && !d.prefill {
                    s.conv.push_assistant(d.stops.text());
                }
                match err {
                    Err((status, msg)) => d.ans.err(status, msg),
                    // A prefill's pass that did not commit was rolled back above.
                    Ok(()) if d.prefill => d.ans.err(Status::Cancelled, "the prefill was cancelled and rolled back"),
                    Ok(()) => {
                        let r = SessionDecodeReply {
                            tokens: d.produced,
                            finish,
                            context_tokens: s.tokens.len() as u32,
                            prompt_tokens: d.prompt_tokens,
                        };
                        let lm = &self.models[s.model];
                        lm.meters.prompt_tokens.inc_by(u64::from(d.prompt_tokens));
                        d.ans.ok_decode(&r.to_meta(), &lm.info.name, d.produced);
                    }
                }
            }
        }
        self.order.retain(|&o| o != id);
        self.settle_kv(id);
    }

    /// Stops the decodes of closed connections, ends cancelled decodes, starts and ends leases.
    pub(super) fn sweep(&mut self) {
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

    pub(super) fn drain(&mut self) {
        self.drain_logits();
        let mut ids: Vec<u64> = self.order.iter().copied().collect();
        ids.extend(self.sessions.iter().filter(|(_, s)| matches!(s.work, Work::Tokenizing(_))).map(|(&id, _)| id));
        for id in ids {
            self.end_work(id, Err((Status::ShuttingDown, "server is shutting down")), FinishWire::Cancelled);
        }
        // Jobs queued after the last take are refused too.
        let jobs = std::mem::take(&mut self.svc.queue.lock().unwrap_or_else(|p| p.into_inner()).jobs);
        for job in jobs {
            let (ans, _, _) = Answer::from_job(job, &mut self.request_meters);
            ans.err(Status::ShuttingDown, "server is shutting down");
        }
    }

    pub(super) fn publish(&self) {
        self.metrics.sessions_open.set(self.sessions.len() as i64);
        self.metrics.sessions_paused_backpressure.set(self.paused as i64);
        self.publish_breakpoints();
        let swapped: usize = self.models.iter().map(|m| m.engine.vmu().stats().sessions_swapped).sum();
        self.metrics.sessions_swapped.set(swapped as i64);
    }
}
