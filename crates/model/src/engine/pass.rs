//! Passes that stop between layers (breakpoints): one session's input pass runs to layer N,
//! hands back the hidden state after N layers and stops; later it resumes at layer N from a
//! hidden state the caller gives back (the one it read, or a modified one).
//!
//! Invariants:
//! - A pass is one transaction. Its first part grows the session by the input tokens (the KV of
//!   the layers below N is written for them); the session is then *pending*: ordinary steps
//!   refuse it, and [`Engine::session_tokens`] reports its committed length only once the pass
//!   finishes. [`Engine::cancel_pass`] — or any failure of a later part — shrinks it back to its
//!   length before the pass, so a cancelled pass leaves the session as it was.
//! - Between parts nothing of the pass lives on the device but the session's KV blocks, which
//!   the VMU may swap out and back bit for bit like any idle session's; the hidden state is the
//!   caller's.
//! - Resuming with the hidden state that was read gives bit for bit what an uninterrupted pass
//!   gives: the add an uninterrupted pass fuses into the next norm is done when the state is
//!   read, with the same operands.
//! - A prefill's pass commits without sampling ([`Engine::commit_pass`]) once every layer ran:
//!   its KV holds every input token, and the caller keeps the last row's state after L layers;
//!   [`Engine::sample_held`] later samples the next token from that row (final norm, LM head)
//!   without feeding anything, bit for bit what a decode step over the held-back last token
//!   gives (the CPU kernels are batch invariant; the norm's fused add was done at the read).

use djinn_backend::{Backend, SampleParams};
use djinn_vmu::{Residency, SessionId};

use super::Engine;
use crate::error::{ModelError, PassError, Result};
use crate::forward::{LogitsMode, Model, SeqStep, StepMemory, StepState};

/// A pass in progress: its session and the session's length before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Pending {
    pub id: SessionId,
    pub start: usize,
    pub tokens: usize,
    /// Layers whose KV the pass has written for its tokens (where it stopped last).
    pub layer: usize,
}

/// One session's share of [`Engine::sample_held`]: the held-back state of its last token.
#[derive(Clone, Copy, Debug)]
pub struct HeldRow<'a> {
    pub id: SessionId,
    /// The session's last token (in its KV already).
    pub token: u32,
    /// Its state after every layer, before the final norm (`hidden` f32).
    pub hidden: &'a [f32],
}

/// One session's share of a batched part of input passes ([`Engine::passes_to_layer`]).
#[derive(Clone, Copy, Debug)]
pub struct PassSeq<'a> {
    pub id: SessionId,
    /// The pass's input tokens (the same at every part).
    pub tokens: &'a [u32],
    /// The state to resume from (`[tokens, hidden]` f32, after the part's `after` layers);
    /// `None` for a pass's first part (`after = 0`).
    pub hidden: Option<&'a [f32]>,
}

/// Where a part of a pass stops.
enum Stop<'a> {
    /// After this many layers, copying the hidden state out.
    Layer(usize, &'a mut Vec<f32>),
    /// At the end: final norm and LM head, then the caller's read.
    End(LogitsMode),
}

impl<B: Backend> Engine<B> {
    /// Whether `id` has a pass stopped at a breakpoint: its length before the pass.
    pub fn pass_start(&self, id: SessionId) -> Option<usize> {
        self.pending.iter().find(|p| p.id == id).map(|p| p.start)
    }

    /// Sessions with a pass stopped at a breakpoint.
    pub fn paused_sessions(&self) -> usize {
        self.pending.len()
    }

    /// Starts (`from = None`) or continues (`from = Some((layer, hidden))`, the state to resume
    /// with after `layer` layers) the input pass of `tokens` in session `id`, and stops after
    /// `layer` layers (1..=L; L = the residual stream before the final norm), copying the hidden
    /// state `[tokens, hidden]` f32 to `hidden`. The pass stays pending until finished or
    /// cancelled.
    pub fn pass_to_layer(
        &mut self,
        id: SessionId,
        tokens: &[u32],
        from: Option<(usize, &[f32])>,
        layer: usize,
        hidden: &mut Vec<f32>,
    ) -> Result<()> {
        let seq = PassSeq { id, tokens, hidden: from.map(|f| f.1) };
        self.passes_to_layer(&[seq], from.map_or(0, |f| f.0), layer, hidden)
    }

    /// [`Engine::pass_to_layer`] for several sessions' passes at once, in one batched part: every
    /// one starts (`after = 0`, no hidden state) or resumes after the same `after` layers and
    /// stops after `layer`; `hidden` receives their states one after the other, in `seqs` order.
    /// Each row's result is the one its pass alone gives where the backend's kernels are batch
    /// invariant (the CPU backend's are). Bad input changes nothing; a failure while running
    /// rolls back every pass of the batch (all-or-nothing, as a step).
    pub fn passes_to_layer(
        &mut self,
        seqs: &[PassSeq<'_>],
        after: usize,
        layer: usize,
        hidden: &mut Vec<f32>,
    ) -> Result<()> {
        self.pass_part(seqs, after, Stop::Layer(layer, hidden), |_, _, _, _| Ok(()))
    }

    /// Finishes a pending pass from the hidden state after `from.0` layers and copies its
    /// logits (`mode`) to `out`; the pass commits.
    pub fn pass_finish_logits(
        &mut self,
        id: SessionId,
        tokens: &[u32],
        from: (usize, &[f32]),
        mode: LogitsMode,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let seq = PassSeq { id, tokens, hidden: Some(from.1) };
        self.pass_part(&[seq], from.0, Stop::End(mode), |model, be, mem, st| model.read_logits(be, mem, st, out))
    }

    /// Finishes a pending pass and samples the next token (`logits`, if given, receives the
    /// last position's logits first); the pass commits.
    pub fn pass_finish_sample(
        &mut self,
        id: SessionId,
        tokens: &[u32],
        from: (usize, &[f32]),
        params: SampleParams,
        logits: Option<&mut Vec<f32>>,
    ) -> Result<u32> {
        let mut out = Vec::with_capacity(1);
        let seq = PassSeq { id, tokens, hidden: Some(from.1) };
        self.passes_finish_sample(&[seq], from.0, &[params], logits, &mut out)?;
        Ok(out[0])
    }

    /// Finishes several pending passes that stopped after the same `after` layers in one
    /// batched part, and samples each one's next token (`params` per pass) into `out`;
    /// `logits`, if given, receives each pass's last-position logits first (`[seqs × vocab]`).
    /// The passes commit together; a failure rolls every one back.
    pub fn passes_finish_sample(
        &mut self,
        seqs: &[PassSeq<'_>],
        after: usize,
        params: &[SampleParams],
        logits: Option<&mut Vec<f32>>,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        if params.len() != seqs.len() {
            return Err(ModelError::Batch(format!("{} sampling parameters for {} passes", params.len(), seqs.len())));
        }
        self.pass_part(seqs, after, Stop::End(LogitsMode::Last), |model, be, mem, st| {
            if let Some(l) = logits {
                model.read_logits(be, mem, st, l)?;
            }
            model.sample(be, mem, st, params, out)
        })
    }

    /// Commits a pending pass that stopped after the last layer (its state read by
    /// [`Engine::passes_to_layer`] to L) without sampling: the session grows by its input, and
    /// its paused-state charge is released. The caller keeps the last row's state for
    /// [`Engine::sample_held`]. `PassError::NotPaused` when no pass is pending, `Layer` when it
    /// stopped before L (its KV is not complete).
    pub fn commit_pass(&mut self, id: SessionId) -> Result<()> {
        let layers = self.model.cfg.layers;
        let i = self.pending.iter().position(|p| p.id == id).ok_or(PassError::NotPaused)?;
        let p = self.pending[i];
        if p.layer != layers {
            return Err(PassError::Layer { layer: layers, layers, after: p.layer }.into());
        }
        self.pending.swap_remove(i);
        self.vmu.release_paused(id)?;
        Ok(())
    }

    /// Samples each row's next token (`params` per row) into `out` from its held-back state
    /// after every layer (final norm and LM head only; nothing is fed, no KV changes);
    /// `logits`, if given, receives each row's logits first (`[rows × vocab]`). The sessions
    /// must be committed (no pass pending) and are made resident as for a step (the step that
    /// follows needs their KV).
    pub fn sample_held(
        &mut self,
        rows: &[HeldRow<'_>],
        params: &[SampleParams],
        logits: Option<&mut Vec<f32>>,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        let (layers, h) = (self.model.cfg.layers, self.model.cfg.hidden_size);
        let max = self.model.scratch.limits().max_seqs;
        if rows.is_empty() || rows.len() > max || params.len() != rows.len() {
            let msg = format!("{} held rows with {} sampling parameters (1..={max} rows)", rows.len(), params.len());
            return Err(ModelError::Batch(msg));
        }
        self.starts.clear();
        self.ids.clear();
        for (i, r) in rows.iter().enumerate() {
            if self.pass_start(r.id).is_some() {
                return Err(PassError::Paused.into());
            }
            if rows[..i].iter().any(|o| o.id == r.id) {
                return Err(ModelError::Batch(format!("session {:?} twice in one part", r.id)));
            }
            let len = self.vmu.session_tokens(r.id)?;
            if len == 0 || r.hidden.len() != h {
                return Err(
                    PassError::Shape { values: r.hidden.len(), tokens: 1, hidden: h, pending_tokens: len }.into()
                );
            }
            self.starts.push(len - 1);
            self.ids.push(r.id);
        }
        let ids = std::mem::take(&mut self.ids);
        let prepared =
            self.vmu.ensure_resident(&ids).map_err(ModelError::from).and_then(|()| self.free_blocks_for(0, &ids));
        self.ids = ids;
        let result = prepared.and_then(|()| {
            let weights_base = self.lease.offset();
            let mut parts = self.vmu.step_parts();
            let mem = super::step_memory(&mut parts, weights_base, self.model.scratch.bytes())?;
            let mut steps = Vec::with_capacity(rows.len());
            for (i, r) in rows.iter().enumerate() {
                steps.push(SeqStep {
                    tokens: std::slice::from_ref(&r.token),
                    start_pos: self.starts[i],
                    block_table: parts.tables.get(r.id)?,
                });
            }
            let (be, model) = (parts.backend, &self.model);
            let mut st = model.begin_at(be, &mem, &steps, LogitsMode::Last, layers)?;
            let all: Vec<f32>;
            let hid = match rows {
                [one] => one.hidden,
                _ => {
                    all = rows.iter().flat_map(|r| r.hidden.iter().copied()).collect();
                    &all[..]
                }
            };
            model.write_hidden(be, &mem, &mut st, hid)?;
            model.finish(be, &mem, &st)?;
            if let Some(l) = logits {
                model.read_logits(be, &mem, &st, l)?;
            }
            model.sample(be, &mem, &st, params, out)
        });
        self.vmu.end_step();
        result
    }

    /// Rolls a pending pass back: the session is as it was before the pass (its paused state's
    /// charge released).
    pub fn cancel_pass(&mut self, id: SessionId) -> Result<()> {
        let i = self.pending.iter().position(|p| p.id == id).ok_or(PassError::NotPaused)?;
        let p = self.pending.swap_remove(i);
        self.vmu.truncate(id, p.start)?;
        self.vmu.release_paused(id)?;
        Ok(())
    }

    /// Charges `bytes` of paused state (a pass's hidden state while it is paused) to session
    /// `id` in the VMU, replacing its previous charge: against the KV capacity (bytes in a pool of
    /// whole blocks the paused states share) when `keep_free` blocks stay free (what the part
    /// producing it appends), else in the host swap pool; moved to the host pool when
    /// the session is swapped out. `VmuError::PausedNoRoom` when neither has room (nothing
    /// changed: the caller waits).
    pub fn hold_paused_state(&mut self, id: SessionId, bytes: usize, keep_free: usize) -> Result<Residency> {
        Ok(self.vmu.hold_paused(id, bytes, keep_free)?)
    }

    /// Releases session `id`'s paused-state charge (none held: nothing).
    pub fn release_paused_state(&mut self, id: SessionId) -> Result<()> {
        Ok(self.vmu.release_paused(id)?)
    }

    /// Checks one pass of a part: its length before the pass (new passes are not pending yet).
    fn check_seq(&self, seq: &PassSeq<'_>, after: usize) -> Result<usize> {
        let (layers, h) = (self.model.cfg.layers, self.model.cfg.hidden_size);
        let toks = seq.tokens;
        match (seq.hidden, self.pending.iter().find(|p| p.id == seq.id)) {
            (None, Some(_)) => Err(PassError::Paused.into()),
            (Some(_), None) => Err(PassError::NotPaused.into()),
            (None, None) if after > 0 => Err(PassError::NotPaused.into()),
            (Some(_), Some(_)) if after == 0 => Err(PassError::Paused.into()),
            (Some(hid), Some(p)) => {
                if toks.len() != p.tokens || after > layers || hid.len() != toks.len() * h {
                    return Err(PassError::Shape {
                        values: hid.len(),
                        tokens: toks.len(),
                        hidden: h,
                        pending_tokens: p.tokens,
                    }
                    .into());
                }
                Ok(p.start)
            }
            (None, None) => {
                let start = self.vmu.session_tokens(seq.id)?;
                if toks.len() > self.max_step_tokens() {
                    return Err(PassError::TooManyTokens { tokens: toks.len(), max: self.max_step_tokens() }.into());
                }
                if start + toks.len() > self.max_context_tokens {
                    return Err(ModelError::TooLong { tokens: start + toks.len(), max: self.max_context_tokens });
                }
                self.model.cfg.check_tokens(toks, start)?;
                Ok(start)
            }
        }
    }

    /// Rolls back the passes of `seqs` that are pending (a failed part: all-or-nothing).
    fn roll_back_part(&mut self, seqs: &[PassSeq<'_>]) {
        for seq in seqs {
            if let Some(i) = self.pending.iter().position(|p| p.id == seq.id) {
                let p = self.pending.swap_remove(i);
                if let Err(e) = self.vmu.truncate(p.id, p.start) {
                    panic!("rolling back the pass of session {:?} to {} tokens: {e}", p.id, p.start);
                }
            }
        }
    }

    fn pass_part<R>(
        &mut self,
        seqs: &[PassSeq<'_>],
        after: usize,
        stop: Stop<'_>,
        then: impl FnOnce(&Model, &B, &StepMemory<'_, B>, &StepState) -> Result<R>,
    ) -> Result<R> {
        let layers = self.model.cfg.layers;
        if let Stop::Layer(n, _) = stop {
            if n == 0 || n > layers || n <= after {
                return Err(PassError::Layer { layer: n, layers, after }.into());
            }
        }
        if seqs.is_empty() || seqs.len() > self.model.scratch.limits().max_seqs {
            let max = self.model.scratch.limits().max_seqs;
            return Err(ModelError::Batch(format!("{} passes in one part (1..={max} allowed)", seqs.len())));
        }
        // Bad input first, before the VMU changes anything.
        self.starts.clear();
        self.ids.clear();
        let mut total = 0usize;
        for (i, seq) in seqs.iter().enumerate() {
            let start = self.check_seq(seq, after)?;
            if seqs[..i].iter().any(|s| s.id == seq.id) {
                return Err(ModelError::Batch(format!("session {:?} twice in one part", seq.id)));
            }
            total += seq.tokens.len();
            self.starts.push(start);
            self.ids.push(seq.id);
        }
        if total > self.max_step_tokens() {
            return Err(ModelError::Batch(format!("{total} tokens exceed the step limit {}", self.max_step_tokens())));
        }
        let fresh = after == 0;
        if fresh && self.pending.len() + seqs.len() > self.pending.capacity() {
            return Err(PassError::Full { max: self.pending.capacity() }.into());
        }
        // Residency and room, as in an ordinary step.
        let bt = self.model.block_tokens();
        let need: usize = if fresh {
            seqs.iter().zip(&self.starts).map(|(q, &s)| (s + q.tokens.len()).div_ceil(bt) - s.div_ceil(bt)).sum()
        } else {
            0
        };
        let ids = std::mem::take(&mut self.ids);
        let prepared =
            self.vmu.ensure_resident(&ids).map_err(ModelError::from).and_then(|()| self.free_blocks_for(need, &ids));
        self.ids = ids;
        if let Err(e) = prepared {
            self.roll_back_part(seqs);
            self.vmu.end_step();
            return Err(e);
        }
        if fresh {
            for (i, seq) in seqs.iter().enumerate() {
                self.slots.clear();
                if let Err(e) = self.vmu.append(seq.id, seq.tokens.len(), &mut self.slots) {
                    self.roll_back_part(seqs);
                    self.vmu.end_step();
                    return Err(e.into());
                }
                self.pending.push(Pending { id: seq.id, start: self.starts[i], tokens: seq.tokens.len(), layer: 0 });
            }
        }
        let finishes = matches!(stop, Stop::End(_));
        let stop_at = match &stop {
            Stop::Layer(n, _) => Some(*n),
            Stop::End(_) => None,
        };
        let result = (|| {
            let weights_base = self.lease.offset();
            let mut parts = self.vmu.step_parts();
            let mem = super::step_memory(&mut parts, weights_base, self.model.scratch.bytes())?;
            let mut steps = Vec::with_capacity(seqs.len());
            for (i, seq) in seqs.iter().enumerate() {
                steps.push(SeqStep {
                    tokens: seq.tokens,
                    start_pos: self.starts[i],
                    block_table: parts.tables.get(seq.id)?,
                });
            }
            let (be, model) = (parts.backend, &self.model);
            let mode = match stop {
                Stop::End(mode) => mode,
                Stop::Layer(..) => LogitsMode::Last,
            };
            let mut st = model.begin_at(be, &mem, &steps, mode, after)?;
            if !fresh {
                // The states side by side, as the step's rows are.
                let mut all;
                let hid = match seqs {
                    [one] => one.hidden.unwrap_or_default(),
                    _ => {
                        all = Vec::with_capacity(total * model.cfg.hidden_size);
                        for seq in seqs {
                            all.extend_from_slice(seq.hidden.unwrap_or_default());
                        }
                        &all[..]
                    }
                };
                model.write_hidden(be, &mem, &mut st, hid)?;
            }
            match stop {
                Stop::Layer(n, out) => {
                    while st.next_layer() < n {
                        model.layer(be, &mem, &mut st)?;
                    }
                    model.read_hidden(be, &mem, &mut st, out)?;
                }
                Stop::End(_) => {
                    while st.next_layer() < layers {
                        model.layer(be, &mem, &mut st)?;
                    }
                    model.finish(be, &mem, &st)?;
                }
            }
            then(model, be, &mem, &st)
        })();
        if result.is_err() {
            self.roll_back_part(seqs);
        } else if let Some(n) = stop_at {
            for p in self.pending.iter_mut().filter(|p| seqs.iter().any(|s| s.id == p.id)) {
                p.layer = n;
            }
        } else if finishes {
            // The end of the pass commits it.
            self.pending.retain(|p| !seqs.iter().any(|s| s.id == p.id));
        }
        self.vmu.end_step();
        result
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use djinn_backend::cpu::CpuBackend;

    use super::*;
    use crate::engine::EngineOptions;

    const GREEDY: SampleParams = SampleParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, step: 0 };
    const PROMPT: [u32; 19] = [5, 17, 99, 3, 41, 8, 77, 12, 64, 33, 21, 90, 7, 55, 18, 101, 46, 29, 60];

    fn engine() -> Engine<CpuBackend> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/models/llama-gqa");
        let be = Arc::new(CpuBackend::with_threads(1).unwrap());
        let opts = EngineOptions {
            max_sessions: 4,
            max_step_tokens: 64,
            all_logits: true,
            host_swap_bytes: Some(1 << 20),
            ..EngineOptions::default()
        };
        Engine::load_dir(be, &dir, &opts).unwrap()
    }

    /// Greedy continuation of `n` tokens after a prefill whose last-position logits are `last`.
    fn decode(eng: &mut Engine<CpuBackend>, id: SessionId, last: &[f32], n: usize) -> (Vec<u32>, Vec<f32>) {
        let v = eng.config().vocab_size;
        let mut tok = argmax(&last[last.len() - v..]);
        let (mut toks, mut all) = (vec![tok], Vec::new());
        let (mut out, mut lg) = (Vec::new(), Vec::new());
        for _ in 1..n {
            eng.step_sample_logits(&[(id, &[tok])], &[GREEDY], &mut out, &mut lg).unwrap();
            all.extend_from_slice(&lg);
            tok = out[0];
            toks.push(tok);
        }
        (toks, all)
    }

    fn argmax(xs: &[f32]) -> u32 {
        (0..xs.len()).max_by(|&a, &b| xs[a].total_cmp(&xs[b]).then(b.cmp(&a))).unwrap() as u32
    }

    fn bits(xs: &[f32]) -> Vec<u32> {
        xs.iter().map(|x| x.to_bits()).collect()
    }

    /// Stopping after every layer (and after the last, before the final norm) and resuming with
    /// the state read gives the logits and tokens of an uninterrupted pass, bit for bit; so does
    /// a pass whose session was swapped out while paused.
    #[test]
    fn resume_unmodified_is_bit_identical() {
        let mut plain = engine();
        let id = plain.open_session().unwrap();
        plain.prefill(id, &PROMPT[..3], false, &mut Vec::new()).unwrap();
        let mut want = Vec::new();
        plain.step_logits(&[(id, &PROMPT[3..])], LogitsMode::All, &mut want).unwrap();
        let want_decode = decode(&mut plain, id, &want, 6);

        let layers = plain.config().layers;
        for swap in [false, true] {
            let mut eng = engine();
            let id = eng.open_session().unwrap();
            eng.prefill(id, &PROMPT[..3], false, &mut Vec::new()).unwrap();
            let toks = &PROMPT[3..];
            let mut hid = Vec::new();
            eng.pass_to_layer(id, toks, None, 1, &mut hid).unwrap();
            assert_eq!(hid.len(), toks.len() * eng.config().hidden_size);
            assert_eq!(eng.session_tokens(id).unwrap(), 3, "a paused pass is not committed");
            if swap {
                eng.vmu.swap_out(&[id]).unwrap();
            }
            for n in 2..=layers {
                let prev = std::mem::take(&mut hid);
                eng.pass_to_layer(id, toks, Some((n - 1, &prev)), n, &mut hid).unwrap();
            }
            let mut got = Vec::new();
            eng.pass_finish_logits(id, toks, (layers, &hid), LogitsMode::All, &mut got).unwrap();
            assert_eq!(eng.session_tokens(id).unwrap(), PROMPT.len());
            assert_eq!(bits(&got), bits(&want), "swap {swap}");
            let got_decode = decode(&mut eng, id, &got, 6);
            assert_eq!(got_decode.0, want_decode.0);
            assert_eq!(bits(&got_decode.1), bits(&want_decode.1));
            if swap {
                assert!(eng.vmu().metrics().swap_out_total.get() > 0);
            }
        }
    }

    /// A cancelled pass, or one refused for bad input while paused, leaves the session as it was:
    /// the tokens that follow are those of a session that never saw the pass.
    #[test]
    fn cancel_and_bad_input_leave_the_session_intact() {
        let mut plain = engine();
        let want_id = plain.open_session().unwrap();
        let mut want = Vec::new();
        plain.prefill(want_id, &PROMPT, false, &mut want).unwrap();
        let want = decode(&mut plain, want_id, &want, 5).0;

        let mut eng = engine();
        let id = eng.open_session().unwrap();
        let layers = eng.config().layers;
        let mut hid = Vec::new();
        let err = |r: Result<()>| match r {
            Err(ModelError::Pass(e)) => e,
            other => panic!("expected a pass error, got {other:?}"),
        };
        assert!(matches!(err(eng.pass_to_layer(id, &PROMPT, None, 0, &mut hid)), PassError::Layer { .. }));
        assert!(matches!(err(eng.pass_to_layer(id, &PROMPT, None, layers + 1, &mut hid)), PassError::Layer { .. }));
        assert_eq!(err(eng.pass_to_layer(id, &PROMPT, Some((1, &[0.0; 4])), 2, &mut hid)), PassError::NotPaused);
        assert_eq!(err(eng.cancel_pass(id)), PassError::NotPaused);
        let long = vec![5u32; eng.max_step_tokens() + 1];
        assert!(matches!(err(eng.pass_to_layer(id, &long, None, 1, &mut hid)), PassError::TooManyTokens { .. }));

        eng.pass_to_layer(id, &PROMPT[..7], None, 1, &mut hid).unwrap();
        assert_eq!(err(eng.pass_to_layer(id, &PROMPT[..7], None, 1, &mut hid)), PassError::Paused);
        let mut out = Vec::new();
        assert!(matches!(
            eng.step_sample(&[(id, &[3])], &[GREEDY], &mut out),
            Err(ModelError::Pass(PassError::Paused))
        ));
        let short = hid[..hid.len() - 1].to_vec();
        assert!(matches!(
            err(eng.pass_to_layer(id, &PROMPT[..7], Some((1, &short)), 2, &mut hid)),
            PassError::Shape { .. }
        ));
        let h1 = hid.clone();
        assert!(matches!(
            err(eng.pass_to_layer(id, &PROMPT[..7], Some((1, &h1)), 1, &mut hid)),
            PassError::Layer { .. }
        ));
        // Resume with a modified state, then cancel at the next breakpoint.
        let patched: Vec<f32> = h1.iter().map(|x| x * 2.0).collect();
        eng.pass_to_layer(id, &PROMPT[..7], Some((1, &patched)), 2, &mut hid).unwrap();
        eng.cancel_pass(id).unwrap();
        assert_eq!(eng.session_tokens(id).unwrap(), 0);
        eng.vmu().check_invariants();
        let mut got = Vec::new();
        eng.prefill(id, &PROMPT, false, &mut got).unwrap();
        assert_eq!(decode(&mut eng, id, &got, 5).0, want);
    }

    /// Passes of several sessions (different lengths, some with earlier context) run as one
    /// batched part per layer give each session's hidden states, logits and tokens of its pass
    /// run alone, bit for bit; a bad member refuses the batch without changing any pass.
    #[test]
    fn batched_parts_are_bit_identical_to_single_passes() {
        let feeds: [(&[u32], &[u32]); 3] = [(&PROMPT[..3], &PROMPT[3..]), (&[], &PROMPT[..5]), (&PROMPT[..1], &[42])];
        let mut alone = engine();
        let layers = alone.config().layers;
        let (mut want_hid, mut want_tok, mut want_lg) = (Vec::new(), Vec::new(), Vec::new());
        for (pre, feed) in feeds {
            let id = alone.open_session().unwrap();
            if !pre.is_empty() {
                alone.prefill(id, pre, false, &mut Vec::new()).unwrap();
            }
            let mut hid = Vec::new();
            alone.pass_to_layer(id, feed, None, 1, &mut hid).unwrap();
            let mut per = vec![hid.clone()];
            for n in 2..=layers {
                let prev = std::mem::take(&mut hid);
                alone.pass_to_layer(id, feed, Some((n - 1, &prev)), n, &mut hid).unwrap();
                per.push(hid.clone());
            }
            let mut lg = Vec::new();
            want_tok.push(alone.pass_finish_sample(id, feed, (layers, &hid), GREEDY, Some(&mut lg)).unwrap());
            want_hid.push(per);
            want_lg.push(lg);
        }

        let mut eng = engine();
        let h = eng.config().hidden_size;
        let ids: Vec<SessionId> = feeds
            .iter()
            .map(|(pre, _)| {
                let id = eng.open_session().unwrap();
                if !pre.is_empty() {
                    eng.prefill(id, pre, false, &mut Vec::new()).unwrap();
                }
                id
            })
            .collect();
        let mut hid = Vec::new();
        let seqs: Vec<PassSeq> =
            ids.iter().zip(feeds).map(|(&id, (_, feed))| PassSeq { id, tokens: feed, hidden: None }).collect();
        eng.passes_to_layer(&seqs, 0, 1, &mut hid).unwrap();
        for n in 1..=layers {
            let mut row = 0;
            for (i, (_, feed)) in feeds.iter().enumerate() {
                let mine = &hid[row * h..(row + feed.len()) * h];
                assert_eq!(bits(mine), bits(&want_hid[i][n - 1]), "session {i} after layer {n}");
                row += feed.len();
            }
            if n == layers {
                break;
            }
            let prev = std::mem::take(&mut hid);
            let mut row = 0;
            let seqs: Vec<PassSeq> = ids
                .iter()
                .zip(feeds)
                .map(|(&id, (_, feed))| {
                    let s = PassSeq { id, tokens: feed, hidden: Some(&prev[row * h..(row + feed.len()) * h]) };
                    row += feed.len();
                    s
                })
                .collect();
            if n == 1 {
                // A member with a state of the wrong shape refuses the whole part; nothing changes.
                let mut bad = seqs.clone();
                bad[1].hidden = Some(&prev[..h]);
                assert!(matches!(
                    eng.passes_to_layer(&bad, 1, 2, &mut Vec::new()),
                    Err(ModelError::Pass(PassError::Shape { .. }))
                ));
                assert!(ids.iter().all(|&id| eng.pass_start(id).is_some()));
            }
            eng.passes_to_layer(&seqs, n, n + 1, &mut hid).unwrap();
        }
        let mut row = 0;
        let seqs: Vec<PassSeq> = ids
            .iter()
            .zip(feeds)
            .map(|(&id, (_, feed))| {
                let s = PassSeq { id, tokens: feed, hidden: Some(&hid[row * h..(row + feed.len()) * h]) };
                row += feed.len();
                s
            })
            .collect();
        let (mut toks, mut lg) = (Vec::new(), Vec::new());
        eng.passes_finish_sample(&seqs, layers, &[GREEDY; 3], Some(&mut lg), &mut toks).unwrap();
        assert_eq!(toks, want_tok);
        assert_eq!(bits(&lg), bits(&want_lg.concat()));
        for (&id, (pre, feed)) in ids.iter().zip(feeds) {
            assert_eq!(eng.session_tokens(id).unwrap(), pre.len() + feed.len());
            assert_eq!(eng.pass_start(id), None);
        }
        eng.vmu().check_invariants();
    }

    /// A prefill's pass over all its tokens, committed after the last layer, then sampled from
    /// the held last row (with the session swapped out in between), gives the logits and tokens
    /// of an uninterrupted prefill of all but the last token and a decode step over it, bit for
    /// bit; a pass stopped short of L does not commit, and a cancelled one leaves the session
    /// as it was.
    #[test]
    fn committed_prefill_pass_samples_from_the_held_row() {
        let p = PROMPT.len();
        let mut plain = engine();
        let a = plain.open_session().unwrap();
        plain.prefill(a, &PROMPT[..p - 1], false, &mut Vec::new()).unwrap();
        let (mut out, mut want_lg) = (Vec::new(), Vec::new());
        plain.step_sample_logits(&[(a, &PROMPT[p - 1..])], &[GREEDY], &mut out, &mut want_lg).unwrap();
        let want = decode(&mut plain, a, &want_lg, 5);

        let mut eng = engine();
        let (layers, h) = (eng.config().layers, eng.config().hidden_size);
        let id = eng.open_session().unwrap();
        let mut hid = Vec::new();
        eng.pass_to_layer(id, &PROMPT, None, 1, &mut hid).unwrap();
        assert!(matches!(eng.commit_pass(id), Err(ModelError::Pass(PassError::Layer { .. }))));
        let prev = std::mem::take(&mut hid);
        eng.pass_to_layer(id, &PROMPT, Some((1, &prev)), layers, &mut hid).unwrap();
        assert_eq!(hid.len(), p * h);
        eng.commit_pass(id).unwrap();
        assert_eq!(eng.session_tokens(id).unwrap(), p);
        assert_eq!(eng.pass_start(id), None);
        eng.vmu.swap_out(&[id]).unwrap();
        let last = &hid[(p - 1) * h..];
        let row = HeldRow { id, token: PROMPT[p - 1], hidden: last };
        let (mut toks, mut lg) = (Vec::new(), Vec::new());
        eng.sample_held(&[row], &[GREEDY], Some(&mut lg), &mut toks).unwrap();
        assert_eq!(bits(&lg), bits(&want_lg));
        assert_eq!(toks[0], want.0[0]);
        assert_eq!(eng.session_tokens(id).unwrap(), p, "sampling from a held row feeds nothing");
        let got = decode(&mut eng, id, &lg, 5);
        assert_eq!(got.0, want.0);
        assert_eq!(bits(&got.1), bits(&want.1));
        // A short row is refused; a second prefill pass cancelled leaves the session intact.
        let bad = HeldRow { id, token: 1, hidden: &last[1..] };
        assert!(matches!(eng.sample_held(&[bad], &[GREEDY], None, &mut toks), Err(ModelError::Pass(_))));
        let before = eng.session_tokens(id).unwrap();
        eng.pass_to_layer(id, &PROMPT[..4], None, layers, &mut hid).unwrap();
        eng.cancel_pass(id).unwrap();
        assert_eq!(eng.session_tokens(id).unwrap(), before);
        eng.vmu().check_invariants();
    }

    /// A pass that finishes with a sampled token commits like a step: the session grows by the
    /// input and the next token is the uninterrupted run's.
    #[test]
    fn finish_sample_commits() {
        let mut plain = engine();
        let a = plain.open_session().unwrap();
        let mut out = Vec::new();
        plain.step_sample(&[(a, &PROMPT)], &[GREEDY], &mut out).unwrap();

        let mut eng = engine();
        let id = eng.open_session().unwrap();
        let mut hid = Vec::new();
        eng.pass_to_layer(id, &PROMPT, None, 2, &mut hid).unwrap();
        let mut lg = Vec::new();
        let tok = eng.pass_finish_sample(id, &PROMPT, (2, &hid), GREEDY, Some(&mut lg)).unwrap();
        assert_eq!(tok, out[0]);
        assert_eq!(eng.session_tokens(id).unwrap(), PROMPT.len());
        assert_eq!(eng.pass_start(id), None);
        assert_eq!(lg.len(), eng.config().vocab_size);
    }
}
