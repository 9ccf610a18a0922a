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

use djinn_backend::{Backend, SampleParams};
use djinn_vmu::SessionId;

use super::Engine;
use crate::error::{ModelError, PassError, Result};
use crate::forward::{LogitsMode, Model, SeqStep, StepMemory, StepState};

/// A pass in progress: its session and the session's length before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Pending {
    pub id: SessionId,
    pub start: usize,
    pub tokens: usize,
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
        self.pass_part(id, tokens, from, Stop::Layer(layer, hidden), |_, _, _, _| Ok(()))
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
        self.pass_part(id, tokens, Some(from), Stop::End(mode), |model, be, mem, st| {
            model.read_logits(be, mem, st, out)
        })
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
        self.pass_part(id, tokens, Some(from), Stop::End(LogitsMode::Last), |model, be, mem, st| {
            if let Some(l) = logits {
                model.read_logits(be, mem, st, l)?;
            }
            model.sample(be, mem, st, &[params], &mut out)
        })?;
        Ok(out[0])
    }

    /// Rolls a pending pass back: the session is as it was before the pass.
    pub fn cancel_pass(&mut self, id: SessionId) -> Result<()> {
        let i = self.pending.iter().position(|p| p.id == id).ok_or(PassError::NotPaused)?;
        let p = self.pending.swap_remove(i);
        self.vmu.truncate(id, p.start)?;
        Ok(())
    }

    fn pass_part<R>(
        &mut self,
        id: SessionId,
        toks: &[u32],
        from: Option<(usize, &[f32])>,
        stop: Stop<'_>,
        then: impl FnOnce(&Model, &B, &StepMemory<'_, B>, &StepState) -> Result<R>,
    ) -> Result<R> {
        let layers = self.model.cfg.layers;
        let h = self.model.cfg.hidden_size;
        if let Stop::Layer(n, _) = stop {
            let after = from.map_or(0, |f| f.0);
            if n == 0 || n > layers || n <= after {
                return Err(PassError::Layer { layer: n, layers, after }.into());
            }
        }
        let pending = self.pending.iter().position(|p| p.id == id);
        let start = match (from, pending) {
            (None, Some(_)) => return Err(PassError::Paused.into()),
            (Some(_), None) => return Err(PassError::NotPaused.into()),
            (Some((after, hid)), Some(i)) => {
                let p = self.pending[i];
                if toks.len() != p.tokens || after == 0 || after > layers || hid.len() != toks.len() * h {
                    return Err(PassError::Shape {
                        values: hid.len(),
                        tokens: toks.len(),
                        hidden: h,
                        pending_tokens: p.tokens,
                    }
                    .into());
                }
                p.start
            }
            (None, None) => {
                let start = self.vmu.session_tokens(id)?;
                if toks.len() > self.max_step_tokens() {
                    return Err(PassError::TooManyTokens { tokens: toks.len(), max: self.max_step_tokens() }.into());
                }
                if start + toks.len() > self.max_context_tokens {
                    return Err(ModelError::TooLong { tokens: start + toks.len(), max: self.max_context_tokens });
                }
                self.model.cfg.check_tokens(toks, start)?;
                if self.pending.len() == self.pending.capacity() {
                    return Err(PassError::Full { max: self.pending.capacity() }.into());
                }
                start
            }
        };
        // Residency and room first, as in an ordinary step.
        let bt = self.model.block_tokens();
        let need = if from.is_none() { (start + toks.len()).div_ceil(bt) - start.div_ceil(bt) } else { 0 };
        let prepared =
            self.vmu.ensure_resident(&[id]).map_err(ModelError::from).and_then(|()| self.free_blocks_for(need, &[id]));
        if let Err(e) = prepared {
            self.vmu.end_step();
            return Err(e);
        }
        if from.is_none() {
            self.slots.clear();
            if let Err(e) = self.vmu.append(id, toks.len(), &mut self.slots) {
                self.vmu.end_step();
                return Err(e.into());
            }
            self.pending.push(Pending { id, start, tokens: toks.len() });
        }
        let finishes = matches!(stop, Stop::End(_));
        let result = (|| {
            let weights_base = self.lease.offset();
            let parts = self.vmu.step_parts();
            let scratch_base =
                parts.scratch.alloc(self.model.scratch.bytes(), 256).map_err(djinn_vmu::VmuError::from)?;
            let steps = [SeqStep { tokens: toks, start_pos: start, block_table: parts.tables.get(id)? }];
            let mem = StepMemory {
                stream: parts.backend.default_stream(),
                weights: parts.region,
                weights_base,
                kv: parts.kv,
                scratch: parts.region,
                scratch_base,
            };
            let (be, model) = (parts.backend, &self.model);
            let mode = match stop {
                Stop::End(mode) => mode,
                Stop::Layer(..) => LogitsMode::Last,
            };
            let mut st = model.begin_at(be, &mem, &steps, mode, from.map_or(0, |f| f.0))?;
            if let Some((_, hid)) = from {
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
        if result.is_err() || finishes {
            // Failure rolls the whole pass back; the end of the pass commits it.
            let i = self.pending.iter().position(|p| p.id == id).expect("the pass is pending");
            self.pending.swap_remove(i);
            if result.is_err() {
                if let Err(e) = self.vmu.truncate(id, start) {
                    panic!("rolling back the pass of session {id:?} to {start} tokens: {e}");
                }
            }
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
