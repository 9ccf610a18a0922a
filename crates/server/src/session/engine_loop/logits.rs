//! `Logits` requests as ordinary work: each is fed in chunks, one chunk per loop iteration between
//! the batched steps (at most `prefill_chunk_tokens` rows under the qos scheduler), so scoring a
//! long prompt never holds every stream still. The request at the head of the queue holds the
//! engine's spare session (the VMU has one more than `max_sessions` for it); the rest wait with
//! only their ids.
//!
//! KV memory: a chunk runs only when it fits (`Engine::batch_fits`: idle sessions are swapped to
//! the host pool as for any step). When it does not, the request waits like the latest arrival
//! among sessions — while the model's sessions step — and when nothing of the model ran, it
//! preempts one session by recomputation ([`super::preempt`]) on its own behalf. It is refused
//! with the numbers only when nothing may be preempted (every block is held by sessions that can
//! be neither swapped nor rebuilt); one that cannot fit in the whole capacity was refused when
//! it arrived.

use super::*;

/// One queued `Logits` request.
pub(super) struct LogitsJob {
    ans: Answer,
    model: usize,
    ids: Vec<u32>,
    /// Rows fed so far, and the engine session feeding them (opened when the job reaches the
    /// head of the queue).
    fed: usize,
    sid: Option<djinn_model::SessionId>,
    /// Logits of the rows fed so far (`fed × vocab`; its size was checked against the frame
    /// limit when the request was accepted).
    out: Vec<f32>,
}

impl LogitsJob {
    pub(super) fn new(ans: Answer, model: usize, ids: Vec<u32>) -> Self {
        LogitsJob { ans, model, ids, fed: 0, sid: None, out: Vec::new() }
    }
}

impl<B: Backend> EngineLoop<B> {
    /// Feeds the next chunk of the head `Logits` request if it is for model `m`; answers it when
    /// its last chunk is fed. `stepped`: the model's sessions made progress this iteration (then
    /// a chunk that does not fit waits; else it preempts). Returns whether anything changed.
    pub(super) fn step_logits(&mut self, m: usize, stepped: bool) -> bool {
        // A request whose client is gone is dropped before it costs a step.
        while self.logits_jobs.front().is_some_and(|j| !j.ans.conn.is_alive()) {
            let j = self.logits_jobs.pop_front().expect("checked");
            self.end_logits(j, None);
        }
        let Some(j) = self.logits_jobs.front_mut() else { return false };
        if j.model != m {
            return false;
        }
        let lm = &mut self.models[m];
        let r = match j.sid {
            Some(sid) => Ok(sid),
            None => lm.engine.open_session().inspect(|&sid| j.sid = Some(sid)),
        };
        let chunk = match self.qos.scheduler {
            Scheduler::Qos => self.qos.prefill_chunk_tokens().min(lm.engine.all_logits_rows()),
            // The baseline feeds the whole request at once, as it always did.
            Scheduler::Fcfs => j.ids.len(),
        };
        if let Ok(sid) = r {
            let n = chunk.min(j.ids.len() - j.fed);
            if !lm.engine.batch_fits(&[(sid, n)]) {
                if stepped {
                    return false;
                }
                // Nothing of the model ran: the memory is held by sessions that cannot move.
                // 0 names no session (session ids are never 0): every session may be the victim
                // but the oldest with work, as for the latest arrival.
                if self.preempt_for(m, 0) {
                    return true;
                }
                let st = self.models[m].engine.vmu().stats();
                let msg = format!(
                    "out of KV memory: {} of {} device blocks and {} of {} host swap blocks free, all held by \
                     sessions that can be neither swapped nor recomputed (--kv-capacity-mb, --host-swap-mb)",
                    st.kv_blocks_free, st.kv_blocks_total, st.host_blocks_free, st.host_blocks_total
                );
                tracing::warn!("Logits request refused: {msg}");
                let j = self.logits_jobs.pop_front().expect("checked");
                self.metrics.errors_total.with_label_values(&[Status::OutOfMemory.name()]).inc();
                let engine = &mut self.models[j.model].engine;
                if let Some(sid) = j.sid {
                    let _ = engine.close_session(sid);
                }
                j.ans.err(Status::OutOfMemory, msg);
                return true;
            }
        }
        let j = self.logits_jobs.front_mut().expect("checked");
        let lm = &mut self.models[m];
        let r = r.and_then(|sid| {
            let n = chunk.min(j.ids.len() - j.fed);
            let mut buf = std::mem::take(&mut self.logits);
            let r = lm.engine.prefill(sid, &j.ids[j.fed..j.fed + n], true, &mut buf);
            j.out.extend_from_slice(&buf);
            self.logits = buf;
            j.fed += n;
            r
        });
        let done = j.fed == j.ids.len();
        if r.is_err() || done {
            let j = self.logits_jobs.pop_front().expect("checked");
            self.end_logits(j, Some(r));
        }
        true
    }

    /// Frees the job's engine session and answers it (`None`: its client is gone).
    fn end_logits(&mut self, j: LogitsJob, r: Option<Result<(), ModelError>>) {
        let engine = &mut self.models[j.model].engine;
        let closed = j.sid.map_or(Ok(()), |sid| engine.close_session(sid));
        match r.map(|r| r.and(closed)) {
            None => {}
            Some(Ok(())) => {
                let vocab = self.models[j.model].info.vocab;
                let meta = LogitsReply { rows: j.ids.len() as u32, vocab }.to_meta();
                j.ans.ok(&meta, &[f32_bytes(&j.out)]);
            }
            Some(Err(e)) => {
                self.metrics.errors_total.with_label_values(&[model_status(&e).name()]).inc();
                j.ans.err(model_status(&e), e.to_string());
            }
        }
    }

    /// Drain: every `Logits` request still queued ends with `ShuttingDown`.
    pub(super) fn drain_logits(&mut self) {
        while let Some(j) = self.logits_jobs.pop_front() {
            if let Some(sid) = j.sid {
                let _ = self.models[j.model].engine.close_session(sid);
            }
            j.ans.err(Status::ShuttingDown, "server is shutting down");
        }
    }
}
