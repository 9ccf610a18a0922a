//! Preemption by recomputation: the last resort when a session's step cannot fit in KV memory
//! although the memory is there — every block is held by sessions the VMU cannot swap out
//! (the host swap pool is full too).
//!
//! Order of resort: a step is formed only from sessions whose blocks fit now (the VMU swaps idle
//! ones out to the host pool, least recently used first); a session that does not fit waits
//! while others run; only when nothing of the model can run does the loop drop one session's KV
//! ([`djinn_model::Engine::drop_kv`]) and try again. The victim is the least recently used idle
//! session (the VMU's clock: the same order as swapping), else — when every session has work —
//! the latest arrival among those that cannot run now (behind the stuck session in FCFS order,
//! or paused by their connection), so the oldest session always makes progress and preemption
//! cannot cycle.
//!
//! Invariants:
//! - The conversation is never lost: the session keeps `tokens`; only `kv` goes back to 0, and
//!   the session's next step feeds `tokens[..]` again in chunks (the same path as any input),
//!   then samples as it would have. With batch-invariant kernels the rebuilt KV bit-equals the
//!   dropped one, so the session continues with exactly the tokens and logits of a run that was
//!   never preempted (tests/server_preemption.rs).
//! - A session whose KV did not come from its tokens alone (`recomputable` cleared, e.g. by a
//!   patched hidden state) is never a victim, nor is one paused inside a breakpoint pass.
//! - The tenant's KV charge (its quota) counts the session's tokens, preempted or not: it will
//!   hold them again.

use super::*;

impl<B: Backend> EngineLoop<B> {
    /// Frees KV for session `stuck` of model `m` by dropping one other session's KV; returns
    /// whether one was dropped (false: nothing may be preempted).
    pub(super) fn preempt_for(&mut self, m: usize, stuck: u64) -> bool {
        let Some(victim) = self.preempt_victim(m, stuck) else { return false };
        let s = self.sessions.get_mut(&victim).expect("the victim exists");
        match self.models[m].engine.drop_kv(s.vs) {
            Ok(tokens) => {
                debug_assert_eq!(tokens, s.kv);
                s.kv = 0;
                self.metrics.sessions_preempted_total.inc();
                self.metrics.preempted_tokens_total.inc_by(tokens as u64);
                tracing::info!(
                    session = victim,
                    for_session = stuck,
                    kv_tokens = tokens,
                    "preempted: KV dropped (device and host swap full); rebuilt from its tokens when it runs again"
                );
                true
            }
            Err(e) => {
                // Only a session id the loop holds gets here: nothing was dropped.
                tracing::error!(session = victim, error = %e, "dropping a session's KV");
                false
            }
        }
    }

    /// The oldest session of model `m` whose work could be stepped but for KV memory: not paused
    /// by its connection's backpressure, not running a breakpoint pass (those run apart).
    pub(super) fn oldest_waiting(&self, m: usize) -> Option<u64> {
        self.order.iter().copied().find(|id| {
            let s = &self.sessions[id];
            s.model == m
                && match &s.work {
                    Work::Idle | Work::Tokenizing(_) => false,
                    Work::Feed { .. } => true,
                    Work::Decode(d) => d.brk.is_none() && !d.ans.conn.out.is_full(),
                }
        })
    }

    /// The session whose KV goes: the least recently used idle one, else the latest arrival
    /// among those with work that cannot run now. Only recomputable sessions of model `m` that
    /// hold KV, never `stuck`.
    fn preempt_victim(&self, m: usize, stuck: u64) -> Option<u64> {
        let eng = &self.models[m].engine;
        let holds = |id: &u64| {
            let s = &self.sessions[id];
            // A session mid-pass at a breakpoint is the engine's open transaction: never a victim.
            *id != stuck && s.model == m && s.recomputable && s.kv > 0 && eng.pass_start(s.vs).is_none()
        };
        let idle = self
            .sessions
            .iter()
            .filter(|(id, s)| !s.has_work() && holds(id))
            .min_by_key(|(_, s)| eng.last_used(s.vs).unwrap_or(0))
            .map(|(&id, _)| id);
        if idle.is_some() {
            return idle;
        }
        // Every session has work. Those behind `stuck` in FCFS order wait for it anyway, and a
        // paused one is not stepped until its client reads: the latest arrival goes first.
        let behind = self.order.iter().position(|&id| id == stuck).unwrap_or(0);
        self.order
            .iter()
            .enumerate()
            .rev()
            .find(|&(i, id)| {
                let paused = match &self.sessions[id].work {
                    Work::Decode(d) => d.ans.conn.out.is_full(),
                    _ => false,
                };
                (i > behind || paused) && holds(id)
            })
            .map(|(_, &id)| id)
    }
}
