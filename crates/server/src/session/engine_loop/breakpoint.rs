//! Breakpoints in the engine loop: a decode or prefill whose request carries breakpoint layers
//! feeds its input in one pass that runs part by part (`Engine::passes_to_layer`), outside the
//! decode batches; at each breakpoint the session pauses and its client is told (`SessionPaused`).
//! Passes at the same point (resuming after the same layer, stopping at the same next one) run
//! their part as one batched pass, as decode rows are batched (one pass over the layers for
//! all of them, the weights read once; `breakpoint_part_passes_max` bounds it). While paused,
//! the client reads the hidden state (f32 or the model's dtype), writes a replacement of the
//! same shape, and resumes; `SessionCancel` — or the pause's lease (`breakpoint_lease_ms`)
//! running out — ends the request `Cancelled` and rolls the pass back; the loop's wait wakes at
//! the first lease's deadline.
//!
//! Invariants:
//! - The paused pass is the engine's transaction: committed when the last part samples the first
//!   token, rolled back (`Engine::cancel_pass`, in `end_work`) otherwise, so the session is as
//!   before the request. Batching changes neither the bits (the CPU kernels are batch invariant,
//!   attention is per sequence) nor the transactions: a batched part that fails is retried pass
//!   by pass, so one pass's bad input or failure ends only its own request.
//! - A paused session holds no pinned device memory: its KV is swappable like an idle session's
//!   (the VMU's LRU victim policy). Its hidden state (`[tokens, hidden]` f32, kept here) is
//!   charged to the VMU (`Engine::hold_paused_state`) before the part that produces it runs:
//!   against the KV capacity, byte-accounted in a pool of whole blocks the paused states share,
//!   else in the host swap pool, moving there when the session is swapped out; so KV and paused state together never exceed the capacity. With no
//!   room in either (or none left for the part's KV beside it), a new pass waits before its
//!   first part (running, not paused) until another pause or session ends; a paused pass's next
//!   state replaces its charge (same size: it never waits). The charge is released when its
//!   last part starts, or when the pass is rolled back. `djinn_breakpoint_held_bytes` counts the bytes themselves.
//! - The state's rows are the tokens the pass feeds: the request's input, preceded by the
//!   session's one pending token when an earlier prefill left one.
//! - A prefill's pass feeds every token, the last included (an ordinary prefill holds the last
//!   back for the decode that samples): after its last breakpoint it runs to layer L and
//!   commits (`Engine::commit_pass`), answering `PrefillReply`; the session keeps the last
//!   row's state after L layers (`Session::held`), from which the next decode without input
//!   samples its first token (`Engine::sample_held`, batched, outside the decode steps) —
//!   bit for bit the token an uninterrupted prefill + decode gives, or, patched, the one the
//!   patch leads to. Rolled back, the session keeps what it held before (tokens, KV, row).
//!   The commit and the held row are [`held`]'s.
//! - A session whose KV came from a patched state is marked not `recomputable`.

use djinn_model::{PassSeq, Residency};
use djinn_proto::{HiddenDType, HiddenDesc, HiddenReadReq, HiddenWriteReq, PausedNote, ResumeReply};

use crate::staging::{Staged, CHUNK_BYTES};

use super::*;

mod held;

/// `dst` filled with the first `dst.len() / dtype.size_bytes()` values of `src` as `dtype`,
/// little-endian (the wire's hidden-state encoding).
fn encode_hidden(dtype: HiddenDType, src: &[f32], dst: &mut [u8]) {
    match dtype {
        HiddenDType::F32 => dst.copy_from_slice(&f32_bytes(src)[..dst.len()]),
        HiddenDType::F16 => {
            for (d, &x) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&half::f16::from_f32(x).to_le_bytes());
            }
        }
        HiddenDType::BF16 => {
            for (d, &x) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&half::bf16::from_f32(x).to_le_bytes());
            }
        }
    }
}

/// A decode's input pass with breakpoints.
pub(super) struct BreakState {
    /// Breakpoint layers, increasing; `next` is the index of the next stop.
    layers: Vec<u32>,
    next: usize,
    /// The layer the pass stopped at last (the pass is pending in the engine), with the state
    /// it resumes from (`[tokens, hidden]` f32).
    at: Option<usize>,
    hidden: Vec<f32>,
    /// Set while paused: the client has not resumed yet.
    paused_since: Option<Instant>,
    patched: bool,
    /// Pauses of this pass during which its KV was swapped out to host memory.
    swaps: u32,
    /// A prefill's pass: the layer after which it commits (L) once past its breakpoints.
    end: Option<u32>,
    /// Not a pass: a decode's first token sampled from the session's held row (`hidden`).
    from_held: bool,
}

/// Where a running pass is: the layer its next part resumes after (0: not started) and the
/// layer it stops at next (`None`: the end). Passes at one point run as one batched part.
type Point = (u32, Option<u32>);

impl BreakState {
    /// Whether the engine holds a pending pass for it (to roll back when the request ends).
    pub(super) fn started(&self) -> bool {
        self.at.is_some() && !self.from_held
    }

    fn point(&self) -> Point {
        (self.at.unwrap_or(0) as u32, self.layers.get(self.next).copied().or(self.end))
    }

    /// Whether the pass's next part ends in a pause (else it finishes or commits).
    fn pauses_next(&self) -> bool {
        self.next < self.layers.len()
    }

    /// A prefill's pass paused after its last layer, resumed: it commits with no part to run.
    fn commits_now(&self) -> bool {
        !self.pauses_next() && self.end.is_some() && self.at.map(|a| a as u32) == self.end
    }
}

/// Wire dtype of a weights dtype (the "model's dtype" a read may ask for).
fn model_dtype(d: djinn_backend::DType) -> HiddenDType {
    match d {
        djinn_backend::DType::F16 => HiddenDType::F16,
        djinn_backend::DType::BF16 => HiddenDType::BF16,
        _ => HiddenDType::F32,
    }
}

impl<B: Backend> EngineLoop<B> {
    /// Checks a decode's (`prefill`: a prefill's) breakpoints against model `m` and the input it
    /// feeds (already added to session `id`); `None` without breakpoints.
    pub(super) fn check_breakpoints(
        &self,
        m: usize,
        id: u64,
        layers: &[u32],
        prefill: bool,
    ) -> Result<Option<Box<BreakState>>, Refusal> {
        if layers.is_empty() {
            return Ok(None);
        }
        let eng = &self.models[m].engine;
        let l = eng.config().layers;
        if let Some(&bad) = layers.iter().find(|&&n| n as usize > l) {
            return Err(Refusal::new(Status::BadArgument, format!("breakpoint layer {bad} outside 1..={l}")));
        }
        let s = &self.sessions[&id];
        let feed = s.tokens.len() - s.kv;
        if feed == 0 {
            let msg = "nothing to feed: a prefill's pass with breakpoints fed every token already (send input \
                       with the breakpoints, or decode without them)";
            return Err(Refusal::new(Status::BadArgument, msg));
        }
        if feed > eng.max_step_tokens() {
            let msg = format!(
                "input of {feed} tokens with breakpoints must run in one pass of at most {} (--max-step-tokens)",
                eng.max_step_tokens()
            );
            return Err(Refusal::new(Status::LimitExceeded, msg));
        }
        Ok(Some(Box::new(BreakState {
            layers: layers.to_vec(),
            next: 0,
            at: None,
            hidden: Vec::new(),
            paused_since: None,
            patched: false,
            swaps: 0,
            end: prefill.then_some(l as u32),
            from_held: false,
        })))
    }

    /// Runs one part of every running (not paused) breakpoint pass of model `m`, and ends the
    /// pauses whose lease ran out. Passes at the same point (resuming after the same layer and
    /// stopping at the same next one, or finishing) run as one batched part, within the step's
    /// token budget and the KV memory that fits now. Returns whether anything changed.
    pub(super) fn step_breakpoints(&mut self, m: usize) -> bool {
        let now = Instant::now();
        let mut run: Vec<(Point, u64)> = Vec::new();
        let (mut expired, mut held, mut commit) = (Vec::new(), Vec::new(), Vec::new());
        for &id in &self.order {
            let s = &self.sessions[&id];
            let Work::Decode(d) = &s.work else { continue };
            match d.brk.as_deref() {
                Some(b) if s.model == m => match b.paused_since {
                    Some(t) if now.duration_since(t) >= self.pause_lease => expired.push(id),
                    Some(_) => {}
                    None if d.ans.conn.out.is_full() => {}
                    None if b.from_held => held.push(id),
                    None if b.commits_now() => commit.push(id),
                    None => run.push((b.point(), id)),
                },
                _ => {}
            }
        }
        let mut progressed = !expired.is_empty() || !commit.is_empty();
        for id in commit {
            self.commit_prefill(m, id, None);
        }
        if !held.is_empty() {
            progressed |= self.sample_held(m, &held);
        }
        for id in expired {
            tracing::info!(session = id, "breakpoint lease over: rolling the request back");
            let msg = "the pause's lease (breakpoint_lease_ms) ran out; the request was rolled back";
            self.end_work(id, Err((Status::Cancelled, msg)), FinishWire::Cancelled);
        }
        // Arrival order within each point (a stable sort keeps `order`'s).
        run.sort_by_key(|&(p, _)| p);
        let mut batch = Vec::new();
        let mut rest = Vec::new();
        for group in run.chunk_by(|a, b| a.0 == b.0) {
            // Every pass of the point gets its part this iteration, in as few parts as fit.
            rest.clear();
            rest.extend(group.iter().map(|&(_, id)| id));
            while !rest.is_empty() {
                batch.clear();
                self.form_part(m, &rest, &mut batch);
                if batch.is_empty() {
                    break; // none fits now: they wait, as a step's sessions would
                }
                progressed |= self.run_parts(m, group[0].0, &batch);
                rest.retain(|id| !batch.contains(id));
            }
        }
        progressed
    }

    /// The sessions of `ids` (at one point) that one batched part takes, in order: within the
    /// step's token budget, `breakpoint_part_passes_max` and the KV memory that fits now; the
    /// rest wait for a later part.
    fn form_part(&self, m: usize, ids: &[u64], into: &mut Vec<u64>) {
        let eng = &self.models[m].engine;
        let seats = eng.model().scratch.limits().max_seqs.min(self.part_passes_max);
        let budget = eng.max_step_tokens();
        let (mut tokens, mut fits) = (0usize, Vec::new());
        for &id in ids {
            let Some(s) = self.sessions.get(&id) else { continue };
            let Work::Decode(d) = &s.work else { continue };
            let Some(b) = d.brk.as_deref() else { continue };
            let feed = s.tokens.len() - s.kv;
            if tokens + feed > budget || into.len() == seats {
                break;
            }
            // The first part grows the session by the input; later ones only need it resident.
            fits.push((s.vs, if b.at.is_none() { feed } else { 0 }));
            if !eng.batch_fits(&fits) {
                fits.pop();
                continue;
            }
            tokens += feed;
            into.push(id);
        }
    }

    /// Runs one batched part of the passes of `ids` (all at `point`): to their next breakpoint
    /// (each pauses there) or to their end (each samples its first token). A refused or failed
    /// part of several passes is retried pass by pass where the pass survived (bad input changes
    /// nothing; a failure while running rolls every pass of the part back), so one bad pass
    /// fails alone.
    fn run_parts(&mut self, m: usize, point: Point, ids: &[u64]) -> bool {
        let ids = &self.charge_states(m, ids)[..];
        if ids.is_empty() {
            return false;
        }
        let lm = &mut self.models[m];
        let (h, layers) = (lm.engine.config().hidden_size, lm.engine.config().layers);
        let mut seqs = Vec::with_capacity(ids.len());
        let mut params = Vec::with_capacity(ids.len());
        let mut want_logits = false;
        for id in ids {
            let s = &self.sessions[id];
            let Work::Decode(d) = &s.work else { unreachable!("formed from decodes") };
            let b = d.brk.as_deref().expect("formed from breakpoint passes");
            let hidden = b.at.map(|_| b.hidden.as_slice());
            seqs.push(PassSeq { id: s.vs, tokens: &s.tokens[s.kv..], hidden });
            params.push(SampleParams { step: 0, ..d.params });
            want_logits |= d.logits != LogitsWire::None;
        }
        let (after, stop) = point;
        let mut hidden = Vec::new();
        let mut sampled = Vec::new();
        let mut logits = Vec::new();
        let ran = match stop {
            Some(layer) => lm.engine.passes_to_layer(&seqs, after as usize, layer as usize, &mut hidden),
            None => {
                let want = want_logits.then_some(&mut logits);
                lm.engine.passes_finish_sample(&seqs, after as usize, &params, want, &mut sampled)
            }
        };
        drop(seqs);
        if ran.is_ok() {
            self.metrics.breakpoint_parts_total.inc();
            self.metrics.breakpoint_part_passes_total.inc_by(ids.len() as u64);
        }
        if let Err(e) = ran {
            if ids.len() == 1 {
                self.fail_part(m, ids[0], &e);
                return true;
            }
            tracing::debug!(error = %e, passes = ids.len(), "batched breakpoint part refused or failed: retrying pass by pass");
            for &id in ids {
                let vs = self.sessions[&id].vs;
                let fresh = point.0 == 0;
                if fresh || self.models[m].engine.pass_start(vs).is_some() {
                    self.run_parts(m, point, &[id]);
                } else {
                    self.fail_part(m, id, &e);
                }
            }
            return true;
        }
        let vocab = self.models[m].engine.config().vocab_size;
        let dtype = model_dtype(self.models[m].engine.model().weights.dtype);
        let lease_ms = self.pause_lease.as_millis().min(u32::MAX as u128) as u32;
        let mut row = 0usize;
        for (i, &id) in ids.iter().enumerate() {
            let s = self.sessions.get_mut(&id).expect("formed from sessions");
            let Work::Decode(d) = &mut s.work else { unreachable!("formed from decodes") };
            let b = d.brk.as_mut().expect("formed from breakpoint passes");
            let feed = s.tokens.len() - s.kv;
            if stop.is_some() && !b.pauses_next() {
                // A prefill's pass past its breakpoints ran to layer L: it commits.
                let last = hidden[(row + feed - 1) * h..(row + feed) * h].to_vec();
                row += feed;
                self.commit_prefill(m, id, Some(last));
                continue;
            }
            match stop {
                Some(layer) => {
                    b.hidden.clear();
                    b.hidden.extend_from_slice(&hidden[row * h..(row + feed) * h]);
                    row += feed;
                    b.at = Some(layer as usize);
                    b.next += 1;
                    b.paused_since = Some(Instant::now());
                    let note = PausedNote {
                        session: id,
                        layer,
                        layers: layers as u32,
                        tokens: feed as u32,
                        hidden: h as u32,
                        model_dtype: dtype,
                        lease_ms,
                    };
                    d.ans.send(Opcode::SessionPaused, Status::Ok, &note.to_meta(), &[]);
                }
                None => {
                    s.kv = s.tokens.len();
                    if b.patched {
                        s.recomputable = false;
                    }
                    d.brk = None;
                    let row = (!logits.is_empty()).then(|| &logits[i * vocab..(i + 1) * vocab]);
                    self.on_token(m, id, sampled[i], row);
                }
            }
        }
        true
    }

    /// Charges the states the part of `ids` will leave paused (at `point`'s stop) to the VMU, or
    /// releases their charge when the part ends the passes; returns the passes that may run:
    /// a new pass with no room for its state, or whose charge leaves the part's KV no room
    /// (`batch_fits` again, the charge counted), waits for a later part, uncharged.
    fn charge_states(&mut self, m: usize, ids: &[u64]) -> Vec<u64> {
        let h = self.models[m].engine.config().hidden_size;
        let bt = self.models[m].engine.model().block_tokens();
        // Blocks the part may append into: every pass's whole KV (a swapped one comes back).
        let keep: usize = ids.iter().filter_map(|id| self.sessions.get(id)).map(|s| s.tokens.len().div_ceil(bt)).sum();
        let (mut run, mut fits) = (Vec::with_capacity(ids.len()), Vec::with_capacity(ids.len()));
        for &id in ids {
            let s = &self.sessions[&id];
            let (vs, feed) = (s.vs, s.tokens.len() - s.kv);
            let (fresh, pauses) = match &s.work {
                Work::Decode(d) => d.brk.as_ref().map_or((false, false), |b| (!b.started(), b.pauses_next())),
                _ => (false, false),
            };
            let eng = &mut self.models[m].engine;
            let charged = match pauses {
                true => eng.hold_paused_state(vs, feed * h * 4, keep).map(drop),
                false => eng.release_paused_state(vs),
            };
            match charged {
                Ok(()) => {
                    // The first part grows the session by the input; later ones only need it
                    // resident (and already fitted with the same charge).
                    fits.push((vs, if fresh { feed } else { 0 }));
                    if fresh && !eng.batch_fits(&fits) {
                        fits.pop();
                        if let Err(e) = eng.release_paused_state(vs) {
                            self.fail_part(m, id, &e);
                        }
                        continue;
                    }
                    run.push(id);
                }
                Err(ModelError::Vmu(VmuError::PausedNoRoom { .. })) => {
                    tracing::debug!(session = id, "no room for the paused state: the pass waits");
                }
                Err(e) => self.fail_part(m, id, &e),
            }
        }
        run
    }

    /// A part of a pass failed: the request ends with the error, and the pass is rolled back
    /// (by the engine already when the part ran, in `end_work` when it was refused).
    fn fail_part(&mut self, m: usize, id: u64, e: &ModelError) {
        tracing::warn!(session = id, error = %e, "breakpoint pass failed");
        if let Some(s) = self.sessions.get(&id) {
            // A pass rolled back holds no state (a no-op when the rollback released it already).
            let _ = self.models[m].engine.release_paused_state(s.vs);
        }
        let pending = self.sessions.get(&id).is_some_and(|s| self.models[m].engine.pass_start(s.vs).is_some());
        if let Some(Work::Decode(d)) = self.sessions.get_mut(&id).map(|s| &mut s.work) {
            if let Some(b) = d.brk.as_mut() {
                if !pending {
                    b.at = None;
                }
            }
        }
        self.end_work(id, Err((model_status(e), &e.to_string())), FinishWire::Cancelled);
    }

    /// The paused pass of the tenant's session `id`, or `NotPaused`.
    fn paused(
        &mut self,
        tenant: &TenantId,
        id: u64,
        conn: &Arc<ConnLink>,
    ) -> Result<(usize, &mut BreakState), Refusal> {
        let s = self.lookup(tenant, id, conn)?;
        let m = s.model;
        match &mut s.work {
            Work::Decode(d) => match d.brk.as_deref_mut() {
                Some(b) if b.paused_since.is_some() => Ok((m, b)),
                _ => Err(Refusal::new(Status::NotPaused, "the session is not paused at a breakpoint")),
            },
            _ => Err(Refusal::new(Status::NotPaused, "the session is not paused at a breakpoint")),
        }
    }

    pub(super) fn hidden_read(
        &mut self,
        ans: Answer,
        tenant: &TenantId,
        r: HiddenReadReq,
        reply: Option<Staged>,
    ) -> Result<(), (Answer, Refusal)> {
        let frame_max = self.frame_bytes_max;
        let (m, at, rows) = match self.paused(tenant, r.session, &ans.conn) {
            Ok((m, b)) => (m, b.at.unwrap_or(0), b.hidden.len()),
            Err(e) => return Err((ans, e)),
        };
        let h = self.models[m].engine.config().hidden_size;
        let mdt = model_dtype(self.models[m].engine.model().weights.dtype);
        if r.dtype != HiddenDType::F32 && r.dtype != mdt {
            let msg = format!("hidden state as {}: f32 or the model's {} only", r.dtype.name(), mdt.name());
            return Err((ans, Refusal::new(Status::DTypeMismatch, msg)));
        }
        let desc = HiddenDesc { layer: at as u32, tokens: (rows / h) as u32, hidden: h as u32, dtype: r.dtype };
        let bytes = desc.bytes().unwrap_or(u64::MAX);
        if bytes + 1024 > frame_max {
            let msg = format!("{bytes} bytes of hidden state exceed the frame limit {frame_max}");
            return Err((ans, Refusal::new(Status::FrameTooLarge, msg)));
        }
        let b = match self.paused(tenant, r.session, &ans.conn) {
            Ok((_, b)) => b,
            Err(e) => return Err((ans, e)),
        };
        // Written into the connection's reply lease and sent from it (over rdma: memory
        // registered already); the chunks start at multiples of CHUNK_BYTES, so no element
        // straddles two.
        let hidden = &b.hidden;
        let size = r.dtype.size_bytes();
        if let Some(mut out) = reply {
            let filled = out.fill(bytes as usize, |at, part| encode_hidden(r.dtype, &hidden[at / size..], part));
            match filled {
                Ok(()) => {
                    ans.ok_staged(&desc.to_meta(), out);
                    return Ok(());
                }
                // The pool is busy or smaller than the state: copied instead, as below.
                Err(e) => {
                    tracing::debug!(session = r.session, error = %e, "hidden-state read answered without staging")
                }
            }
        }
        // No reply lease (the connection's previous read is still being sent) or no room in the
        // pool: the answer is copied into the connection's outbound frame.
        if r.dtype == HiddenDType::F32 {
            ans.ok(&desc.to_meta(), &[f32_bytes(hidden)]);
        } else {
            let mut data = vec![0u8; hidden.len() * size];
            encode_hidden(r.dtype, hidden, &mut data);
            ans.ok(&desc.to_meta(), &[&data]);
        }
        Ok(())
    }

    pub(super) fn hidden_write(
        &mut self,
        ans: Answer,
        tenant: &TenantId,
        r: HiddenWriteReq,
        bytes: Staged,
    ) -> Result<(), (Answer, Refusal)> {
        let (m, b) = match self.paused(tenant, r.session, &ans.conn) {
            Ok(p) => p,
            Err(e) => return Err((ans, e)),
        };
        let at = b.at.unwrap_or(0);
        let rows = b.hidden.len();
        let h = self.models[m].engine.config().hidden_size;
        let mdt = model_dtype(self.models[m].engine.model().weights.dtype);
        let d = r.desc;
        if d.dtype != HiddenDType::F32 && d.dtype != mdt {
            let msg = format!("hidden state as {}: f32 or the model's {} only", d.dtype.name(), mdt.name());
            return Err((ans, Refusal::new(Status::DTypeMismatch, msg)));
        }
        if d.layer as usize != at || d.hidden as usize != h || (d.tokens as usize) * h != rows {
            let msg = format!(
                "hidden state [{}, {}] after layer {}; the paused one is [{}, {h}] after layer {at}",
                d.tokens,
                d.hidden,
                d.layer,
                rows / h
            );
            return Err((ans, Refusal::new(Status::ShapeMismatch, msg)));
        }
        let (_, b) = match self.paused(tenant, r.session, &ans.conn) {
            Ok(p) => p,
            Err(e) => return Err((ans, e)),
        };
        // The bytes sit in staging chunks of CHUNK_BYTES, a multiple of every element size, so no
        // element straddles two chunks.
        const _: () = assert!(CHUNK_BYTES.is_multiple_of(4));
        match d.dtype {
            HiddenDType::F32 => {
                for (x, c) in b.hidden.iter_mut().zip(bytes.chunks().flat_map(|s| s.chunks_exact(4))) {
                    *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            HiddenDType::F16 => {
                for (x, c) in b.hidden.iter_mut().zip(bytes.chunks().flat_map(|s| s.chunks_exact(2))) {
                    *x = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            HiddenDType::BF16 => {
                for (x, c) in b.hidden.iter_mut().zip(bytes.chunks().flat_map(|s| s.chunks_exact(2))) {
                    *x = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        }
        b.patched = true;
        // The chunks go back (and the connection may take its next write) before the answer.
        drop(bytes);
        ans.ok(&[], &[]);
        Ok(())
    }

    pub(super) fn resume(&mut self, ans: Answer, tenant: &TenantId, id: u64) -> Result<(), (Answer, Refusal)> {
        let m = match self.paused(tenant, id, &ans.conn) {
            Ok((m, _)) => m,
            Err(e) => return Err((ans, e)),
        };
        // Only the pass's own next part swaps its KV back in: swapped now = swapped this pause.
        let vs = self.sessions[&id].vs;
        let swapped = self.models[m].engine.vmu().residency(vs).is_ok_and(|r| r == Residency::Swapped);
        let Ok((_, b)) = self.paused(tenant, id, &ans.conn) else { unreachable!("looked up above") };
        b.paused_since = None;
        b.swaps += u32::from(swapped);
        ans.ok(&ResumeReply { swaps: b.swaps }.to_meta(), &[]);
        Ok(())
    }

    /// When the first pause's lease runs out: the loop's park wakes then, so a pause ends at
    /// its deadline, not at the next wake-up.
    pub(super) fn pause_deadline(&self) -> Option<Instant> {
        let paused = self.sessions.values().filter_map(|s| match &s.work {
            Work::Decode(d) => d.brk.as_deref().and_then(|b| b.paused_since),
            _ => None,
        });
        paused.min().map(|t| t + self.pause_lease)
    }

    /// The breakpoint gauges: sessions paused, and the hidden-state bytes they hold.
    pub(super) fn publish_breakpoints(&self) {
        let (mut paused, mut bytes) = (0i64, 0i64);
        for s in self.sessions.values() {
            if let Work::Decode(d) = &s.work {
                if let Some(b) = d.brk.as_deref() {
                    paused += i64::from(b.paused_since.is_some());
                    bytes += (b.hidden.len() * 4) as i64;
                }
            }
        }
        self.metrics.sessions_paused_breakpoint.set(paused);
        self.metrics.breakpoint_held_bytes.set(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each dtype's bytes, from any element offset into the state (a staged answer encodes it
    /// chunk by chunk), are the values' own little-endian encodings.
    #[test]
    fn encode_hidden_writes_each_value_in_its_dtype() {
        let src: Vec<f32> = (0..37).map(|i| (i as f32 - 18.3) * 0.731).collect();
        for dtype in [HiddenDType::F32, HiddenDType::F16, HiddenDType::BF16] {
            let size = dtype.size_bytes();
            let one = |x: f32| match dtype {
                HiddenDType::F32 => x.to_le_bytes().to_vec(),
                HiddenDType::F16 => half::f16::from_f32(x).to_le_bytes().to_vec(),
                HiddenDType::BF16 => half::bf16::from_f32(x).to_le_bytes().to_vec(),
            };
            for from in [0, 1, 16, 36] {
                let mut dst = vec![0u8; (src.len() - from) * size];
                encode_hidden(dtype, &src[from..], &mut dst);
                let want: Vec<u8> = src[from..].iter().flat_map(|&x| one(x)).collect();
                assert_eq!(dst, want, "{} from {from}", dtype.name());
            }
        }
    }
}
