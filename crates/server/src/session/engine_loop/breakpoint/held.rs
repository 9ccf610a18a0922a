//! A prefill's breakpoint pass ends by committing after layer L (no token sampled); the session
//! keeps the last row's state (`Session::held`), and the next decode without input samples its
//! first token from it (`Engine::sample_held`), batched apart from the decode steps.
//!
//! Invariant: a held row is used only while it is valid (`Session::held_row`: the KV holds every
//! token, as many as when it was kept); a decode whose session lost it since (its KV dropped by
//! preemption) decodes as usual, its tokens re-fed.

use djinn_model::HeldRow;

use super::*;

impl<B: Backend> EngineLoop<B> {
    /// For a decode with no input on session `id`: the session's held row as its first
    /// token's source, when it holds a valid one.
    pub(in super::super) fn held_start(&self, id: u64) -> Option<Box<BreakState>> {
        let s = &self.sessions[&id];
        let row = s.held_row()?;
        Some(Box::new(BreakState {
            layers: Vec::new(),
            next: 0,
            at: Some(self.models[s.model].engine.config().layers),
            hidden: row.to_vec(),
            paused_since: None,
            patched: false,
            swaps: 0,
            end: None,
            from_held: true,
        }))
    }

    /// Commits the prefill pass of session `id` that ran every layer (`last`: its last row's
    /// state after L layers, else the state it paused with at L): the session keeps that row
    /// for the next decode, and the prefill is answered.
    pub(super) fn commit_prefill(&mut self, m: usize, id: u64, last: Option<Vec<f32>>) {
        let h = self.models[m].engine.config().hidden_size;
        let vs = self.sessions[&id].vs;
        if let Err(e) = self.models[m].engine.commit_pass(vs) {
            self.fail_part(m, id, &e);
            return;
        }
        let s = self.sessions.get_mut(&id).expect("a pass's session exists");
        let Work::Decode(d) = std::mem::replace(&mut s.work, Work::Idle) else { unreachable!("a prefill's pass") };
        let b = d.brk.as_deref().expect("a prefill's pass");
        let row = last.unwrap_or_else(|| b.hidden[b.hidden.len() - h..].to_vec());
        s.kv = s.tokens.len();
        s.held = Some((s.kv, row.into_boxed_slice()));
        if b.patched {
            s.recomputable = false;
        }
        s.cancel = false;
        let r = PrefillReply { prompt_tokens: d.prompt_tokens, context_tokens: s.tokens.len() as u32 };
        d.ans.ok(&r.to_meta(), &[]);
        self.order.retain(|&o| o != id);
        self.settle_kv(id);
    }

    /// Samples the first token of the decodes of `ids` from their sessions' held rows, in
    /// batched parts within `breakpoint_part_passes_max` and the KV that fits now; a session
    /// whose KV was dropped since (preempted) decodes as usual instead (its tokens re-fed).
    pub(super) fn sample_held(&mut self, m: usize, ids: &[u64]) -> bool {
        let eng = &self.models[m].engine;
        let seats = eng.model().scratch.limits().max_seqs.min(self.part_passes_max);
        let (mut batch, mut fits) = (Vec::new(), Vec::new());
        let mut progressed = false;
        for &id in ids {
            let s = self.sessions.get_mut(&id).expect("listed from sessions");
            let valid = s.held_row().is_some();
            let Work::Decode(d) = &mut s.work else { continue };
            if !valid {
                d.brk = None;
                progressed = true;
                continue;
            }
            fits.push((s.vs, 0));
            if batch.len() == seats || !self.models[m].engine.batch_fits(&fits) {
                fits.pop();
                continue;
            }
            batch.push(id);
        }
        if batch.is_empty() {
            return progressed;
        }
        let mut rows = Vec::with_capacity(batch.len());
        let mut params = Vec::with_capacity(batch.len());
        let mut want_logits = false;
        for id in &batch {
            let s = &self.sessions[id];
            let Work::Decode(d) = &s.work else { unreachable!("listed from decodes") };
            let b = d.brk.as_deref().expect("listed from held decodes");
            rows.push(HeldRow { id: s.vs, token: s.tokens[s.tokens.len() - 1], hidden: &b.hidden });
            params.push(SampleParams { step: 0, ..d.params });
            want_logits |= d.logits != LogitsWire::None;
        }
        let (mut sampled, mut logits) = (Vec::new(), Vec::new());
        let want = want_logits.then_some(&mut logits);
        let ran = self.models[m].engine.sample_held(&rows, &params, want, &mut sampled);
        drop(rows);
        let vocab = self.models[m].engine.config().vocab_size;
        for (i, &id) in batch.iter().enumerate() {
            if let Err(e) = &ran {
                tracing::warn!(session = id, error = %e, "sampling from the held row failed");
                self.end_work(id, Err((model_status(e), &e.to_string())), FinishWire::Cancelled);
                continue;
            }
            if let Some(Work::Decode(d)) = self.sessions.get_mut(&id).map(|s| &mut s.work) {
                d.brk = None;
            }
            let row = (!logits.is_empty()).then(|| &logits[i * vocab..(i + 1) * vocab]);
            self.on_token(m, id, sampled[i], row);
        }
        true
    }
}
