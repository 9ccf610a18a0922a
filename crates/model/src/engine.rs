//! A model served from one device: the VMU (weights lease, paged KV, scratch) plus the model,
//! with session-level calls — open, step a ragged batch, read logits or sampled ids, close.
//!
//! This is what the CLI runs in-process and what a server scheduler drives: [`Engine::step`]
//! takes any mix of sessions with any number of new tokens each (prefill and decode together).
//! Per step the VMU pins the sessions, appends their positions (taking blocks), the model runs
//! over the VMU's block tables, and the scratch arena is reset at the end.
//!
//! KV memory may be oversubscribed (`kv_capacity_bytes` smaller than every session at full
//! length): a step first makes its sessions resident and frees the device blocks it will take by
//! swapping out least-recently-used other sessions to the host pool (the VMU's one victim policy,
//! `Vmu::make_room_for_step`), all before any session
//! grows, so a step that cannot fit fails with nothing changed (`ModelError::Vmu(KvExhausted)`)
//! and the caller may retry with fewer sessions. [`Engine::batch_fits`] predicts it.
//!
//! The engine works through a backend handle of its own, made from the one it is given
//! ([`Backend::handle`]): its forward passes, synchronous copies, workspace and device error
//! word are on a stream no other user of the device can reach (the field is private and never
//! handed out), so a tenant's Exec ops or another model's engine can neither corrupt nor delay
//! its steps, nor be blamed for its errors.
//!
//! A step is all-or-nothing: whatever fails after sessions grew (an append, the forward pass,
//! reading the results) shrinks every session of the step back to its length before it, so the
//! KV never holds positions the caller does not know of.
//!
//! When swapping cannot make room (the host pool is full too), the caller may preempt a session
//! by recomputation: [`Engine::drop_kv`] frees all its KV, and stepping its tokens again later
//! rebuilds it bit for bit (batch-invariant kernels; `tests::recomputed_kv_is_bit_exact`).

use std::path::Path;
use std::sync::Arc;

use djinn_backend::{Backend, DType, SampleParams};
use djinn_vmu::prometheus::Registry;
use djinn_vmu::{Residency, SessionId, Vmu, VmuConfig, WeightsLease, MIB};

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::forward::{LogitsMode, Model, SeqStep, StepLimits, StepMemory};
use crate::weights::WeightLayout;

mod pass;
pub use pass::{HeldRow, PassSeq};
#[cfg(test)]
mod step_timing;

/// Start-up bounds and choices. Every bound sizes a preallocated structure.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Weight storage dtype; `None` keeps the checkpoint's.
    pub dtype: Option<DType>,
    /// KV cache dtype (f32 on the CPU reference; f16/bf16 halve the cache on a GPU).
    pub kv_dtype: DType,
    pub block_tokens: usize,
    /// Longest session; `None` = the model's `max_position_embeddings`.
    pub max_context_tokens: Option<usize>,
    pub max_sessions: usize,
    /// New tokens in one step, over all sessions (bounds the prefill chunk).
    pub max_step_tokens: usize,
    /// Whether a step may return logits for every position (sizes the logits buffer to
    /// `max_step_tokens` rows instead of `max_sessions`).
    pub all_logits: bool,
    /// KV capacity in tokens across all sessions; `None` = `max_sessions × max_context_tokens`.
    pub kv_tokens: Option<usize>,
    /// KV capacity in bytes (`--kv-capacity-mb`); overrides `kv_tokens` (rounded down to blocks).
    pub kv_capacity_bytes: Option<usize>,
    /// Pinned host pool for swapped-out sessions (`--host-swap-mb`); `None` = one block (enough
    /// when KV is never oversubscribed).
    pub host_swap_bytes: Option<usize>,
    /// Logits rows of one all-positions step (`all_logits`); `None` = `max_step_tokens`. Smaller
    /// keeps the logits buffer small for large vocabularies: `prefill(.., all)` chunks by it.
    pub all_logits_rows: Option<usize>,
    /// Where the VMU registers its metrics (a server's /metrics); `None` = a private registry.
    pub registry: Option<Registry>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            dtype: None,
            kv_dtype: DType::F32,
            block_tokens: 16,
            max_context_tokens: None,
            max_sessions: 4,
            max_step_tokens: 512,
            all_logits: false,
            kv_tokens: None,
            kv_capacity_bytes: None,
            host_swap_bytes: None,
            all_logits_rows: None,
            registry: None,
        }
    }
}

pub struct Engine<B: Backend> {
    backend: Arc<B>,
    vmu: Vmu<B>,
    lease: WeightsLease,
    model: Model,
    max_context_tokens: usize,
    /// Reused per step (capacity fixed at start-up).
    slots: Vec<i32>,
    starts: Vec<usize>,
    ids: Vec<SessionId>,
    /// Passes stopped at a breakpoint (at most `max_sessions`; see [`pass`]).
    pending: Vec<pass::Pending>,
}

impl<B: Backend> Engine<B> {
    /// Loads `dir` (config.json + safetensors) onto `backend`.
    pub fn load_dir(backend: Arc<B>, dir: &Path, opts: &EngineOptions) -> Result<Self> {
        let cfg = ModelConfig::load(dir)?;
        let ck = Checkpoint::open(dir)?;
        Self::from_checkpoint(backend, &ck, cfg, opts)
    }

    /// Validates every tensor, reserves the VMU sized for this model and `opts`, and uploads the
    /// weights once. The engine makes its own handle on `backend`'s device (module docs).
    pub fn from_checkpoint(backend: Arc<B>, ck: &Checkpoint, cfg: ModelConfig, opts: &EngineOptions) -> Result<Self> {
        let dtype = WeightLayout::choose_dtype(ck, opts.dtype)?;
        let layout = WeightLayout::validate_for(ck, &cfg, dtype, backend.quantized_weights())?;
        let max_ctx = opts.max_context_tokens.unwrap_or(cfg.max_position_embeddings).min(cfg.max_position_embeddings);
        if max_ctx == 0 || opts.max_sessions == 0 || opts.max_step_tokens == 0 || opts.block_tokens == 0 {
            return Err(ModelError::Memory("engine bounds must be non-zero".into()));
        }
        let kv_layout = Model::kv_layout(&cfg, opts.block_tokens, opts.kv_dtype);
        let max_blocks = max_ctx.div_ceil(opts.block_tokens);
        let limits = StepLimits {
            max_tokens: opts.max_step_tokens,
            max_seqs: opts.max_sessions,
            max_blocks_per_seq: max_blocks,
            max_logit_rows: if opts.all_logits {
                opts.all_logits_rows
                    .unwrap_or(opts.max_step_tokens)
                    .clamp(1, opts.max_step_tokens)
                    .max(opts.max_sessions)
            } else {
                opts.max_sessions
            },
        };
        check_step_workspace(backend.step_workspace_bytes(), &cfg, dtype, opts.max_step_tokens)?;
        // This engine's own stream, workspace and error word: nothing else holds this handle.
        let backend = backend.handle()?;
        let model_probe = Model::new(cfg.clone(), layout.clone(), limits, opts.block_tokens);
        let kv_tokens = opts.kv_tokens.unwrap_or(opts.max_sessions * max_blocks * opts.block_tokens);
        let mut vcfg = VmuConfig::new(kv_layout);
        // Weights plus one granule of slack for the allocator's rounding.
        vcfg.weights_bytes = layout.total_bytes + 4096;
        vcfg.kv_capacity_bytes = Some(match opts.kv_capacity_bytes {
            Some(b) => b / kv_layout.block_bytes() * kv_layout.block_bytes(),
            None => kv_tokens.div_ceil(opts.block_tokens) * kv_layout.block_bytes(),
        });
        if vcfg.kv_capacity_bytes == Some(0) {
            return Err(ModelError::Memory(format!(
                "KV capacity below one block of {} bytes",
                kv_layout.block_bytes()
            )));
        }
        vcfg.scratch_bytes = model_probe.scratch.bytes() + 4096;
        vcfg.max_sessions = opts.max_sessions;
        vcfg.max_context_tokens = max_blocks * opts.block_tokens;
        vcfg.max_persistent_allocations = 16;
        // In-process use never oversubscribes KV (it is sized for every session at full length),
        // so by default the swap pool only needs to exist.
        vcfg.host_swap_bytes = Some(opts.host_swap_bytes.unwrap_or(0).max(kv_layout.block_bytes()));
        vcfg.swap_staging_bytes = kv_layout.block_bytes().max(MIB);
        let registry = opts.registry.clone().unwrap_or_default();
        let vmu = Vmu::new(backend.clone(), vcfg, &registry)?;
        let name = ck.dir().display().to_string();
        let lease = vmu.alloc_weights(&name, layout.total_bytes)?;
        let layout = if lease.is_fresh() {
            WeightLayout::upload(ck, &cfg, dtype, &*backend, vmu.region(), lease.offset())?
        } else {
            layout
        };
        tracing::info!(
            model = %name,
            resident_weight_bytes = layout.total_bytes,
            checkpoint_tensor_bytes = layout.source_bytes,
            "weights resident: {} bytes for {} bytes of checkpoint tensors ({:+.2} %)",
            layout.total_bytes,
            layout.source_bytes,
            (layout.total_bytes as f64 / layout.source_bytes.max(1) as f64 - 1.0) * 100.0
        );
        let model = Model::new(cfg, layout, limits, opts.block_tokens);
        Ok(Engine {
            backend,
            vmu,
            lease,
            model,
            max_context_tokens: max_ctx,
            slots: Vec::with_capacity(opts.max_step_tokens),
            starts: Vec::with_capacity(opts.max_sessions),
            ids: Vec::with_capacity(opts.max_sessions),
            pending: Vec::with_capacity(opts.max_sessions),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.model.cfg
    }
    pub fn model(&self) -> &Model {
        &self.model
    }
    /// The engine's own handle: for reading state (`info`, counters) on the engine's thread.
    /// Work issued through it joins the engine's stream, so only the engine's thread may.
    pub fn backend(&self) -> &B {
        &self.backend
    }
    pub fn vmu(&self) -> &Vmu<B> {
        &self.vmu
    }
    pub fn max_context_tokens(&self) -> usize {
        self.max_context_tokens
    }
    pub fn max_step_tokens(&self) -> usize {
        self.model.scratch.limits().max_tokens
    }

    /// Rows of logits one all-positions step returns at most (the `prefill(.., all)` chunk).
    pub fn all_logits_rows(&self) -> usize {
        self.model.scratch.limits().max_logit_rows.min(self.max_step_tokens())
    }

    pub fn open_session(&mut self) -> Result<SessionId> {
        Ok(self.vmu.open_session()?)
    }

    pub fn close_session(&mut self, id: SessionId) -> Result<()> {
        self.pending.retain(|p| p.id != id);
        Ok(self.vmu.close_session(id)?)
    }

    /// Whether a step over `seqs` (session, new tokens) fits in KV memory now: every session's
    /// blocks at once on the device, and room in the host pool for the whole sessions the VMU's
    /// victim policy would displace (`Vmu::room_possible`, not crediting the host slots the
    /// step's own swap-ins give back). Conservative: `false` may still run; `true` always does.
    pub fn batch_fits(&self, seqs: &[(SessionId, usize)]) -> bool {
        let st = self.vmu.stats();
        let bt = self.model.block_tokens();
        let (mut total, mut take) = (0usize, 0usize);
        for &(id, n) in seqs {
            let (Ok(t), Ok(r)) = (self.vmu.session_tokens(id), self.vmu.residency(id)) else {
                return false;
            };
            let (have, fin) = (t.div_ceil(bt), (t + n).div_ceil(bt));
            total += fin;
            take += if r == Residency::Swapped { fin } else { fin - have };
        }
        total <= st.kv_blocks_total && self.vmu.room_possible(take, |id| seqs.iter().any(|s| s.0 == id))
    }

    /// Frees `need` device blocks for a step over `batch` (already pinned), swapping out the
    /// least recently used other sessions: the VMU's one victim policy.
    fn free_blocks_for(&mut self, need: usize, batch: &[SessionId]) -> Result<()> {
        match batch.first() {
            Some(&first) => Ok(self.vmu.make_room_for_step(need, first)?),
            None => Ok(()),
        }
    }

    /// The session's swap-out rank: lower ranks are swapped out first when a step needs room,
    /// then the least recently stepped (the server passes the QoS class).
    pub fn set_swap_rank(&mut self, id: SessionId, rank: u8) -> Result<()> {
        Ok(self.vmu.set_evict_rank(id, rank)?)
    }

    /// The session's committed length (a pass stopped at a breakpoint is not counted).
    pub fn session_tokens(&self, id: SessionId) -> Result<usize> {
        if let Some(start) = self.pass_start(id) {
            return Ok(start);
        }
        Ok(self.vmu.session_tokens(id)?)
    }

    /// When the session was last stepped or swapped in, on the VMU's clock: the one victim
    /// policy's order (least recently used first), for swapping and preemption alike.
    pub fn last_used(&self, id: SessionId) -> Result<u64> {
        Ok(self.vmu.last_used(id)?)
    }

    /// Preemption by recomputation: drops all of session `id`'s KV (device blocks or host swap
    /// slots) and returns the tokens it held. The session stays open, empty; its owner rebuilds
    /// the KV by stepping the same tokens again, and gets the same bits back where the backend's
    /// kernels are batch-invariant (each row's result independent of the rows beside it and of
    /// how the tokens are split into steps: the CPU backend's are). Never call it on a session
    /// whose KV did not come from its tokens alone (e.g. a patched hidden state).
    pub fn drop_kv(&mut self, id: SessionId) -> Result<usize> {
        let tokens = self.vmu.session_tokens(id)?;
        self.vmu.truncate(id, 0)?;
        Ok(tokens)
    }

    /// Runs one step over `seqs` (session, new tokens) and leaves the logits in scratch for
    /// `then`, which reads them (logits or sampled ids) before the arena is reset.
    fn step_with<R>(
        &mut self,
        seqs: &[(SessionId, &[u32])],
        mode: LogitsMode,
        then: impl FnOnce(&Model, &B, &StepMemory<'_, B>, &crate::forward::StepState) -> Result<R>,
    ) -> Result<R> {
        // Reject bad input before the VMU changes anything.
        let mut total = 0usize;
        self.starts.clear();
        for &(id, toks) in seqs {
            if self.pass_start(id).is_some() {
                return Err(crate::error::PassError::Paused.into());
            }
            let start = self.vmu.session_tokens(id)?;
            if start + toks.len() > self.max_context_tokens {
                return Err(ModelError::TooLong { tokens: start + toks.len(), max: self.max_context_tokens });
            }
            self.model.cfg.check_tokens(toks, start)?;
            total += toks.len();
            self.starts.push(start);
        }
        if total > self.max_step_tokens() {
            return Err(ModelError::Batch(format!("{total} tokens exceed the step limit {}", self.max_step_tokens())));
        }
        self.ids.clear();
        self.ids.extend(seqs.iter().map(|s| s.0));
        let ids = std::mem::take(&mut self.ids);
        // Residency and room first: nothing grows until every block this step takes is free,
        // so a step that does not fit changes no session.
        let bt = self.model.block_tokens();
        let prepared = self.vmu.ensure_resident(&ids).map_err(ModelError::from).and_then(|()| {
            let need: usize =
                seqs.iter().zip(&self.starts).map(|(&(_, t), &s)| (s + t.len()).div_ceil(bt) - s.div_ceil(bt)).sum();
            self.free_blocks_for(need, &ids)
        });
        self.ids = ids;
        if let Err(e) = prepared {
            self.vmu.end_step();
            return Err(e);
        }
        for (i, &(id, toks)) in seqs.iter().enumerate() {
            self.slots.clear();
            if let Err(e) = self.vmu.append(id, toks.len(), &mut self.slots) {
                self.rollback(&seqs[..i]);
                self.vmu.end_step();
                return Err(e.into());
            }
        }
        let result = (|| {
            let weights_base = self.lease.offset();
            let mut parts = self.vmu.step_parts();
            let mem = step_memory(&mut parts, weights_base, self.model.scratch.bytes())?;
            let mut steps = Vec::with_capacity(seqs.len());
            for (i, &(id, toks)) in seqs.iter().enumerate() {
                steps.push(SeqStep { tokens: toks, start_pos: self.starts[i], block_table: parts.tables.get(id)? });
            }
            let st = self.model.forward(parts.backend, &mem, &steps, mode)?;
            then(&self.model, parts.backend, &mem, &st)
        })();
        if result.is_err() {
            self.rollback(seqs);
        }
        self.vmu.end_step();
        result
    }

    /// Undoes the growth of `seqs` in a failed step: each session back to its length before it
    /// (`self.starts`), so the step is all-or-nothing and the caller may retry any subset.
    fn rollback(&mut self, seqs: &[(SessionId, &[u32])]) {
        for (&(id, _), &start) in seqs.iter().zip(&self.starts) {
            if let Err(e) = self.vmu.truncate(id, start) {
                // Only an id the step itself looked up could get here: a broken invariant.
                panic!("rolling back session {id:?} to {start} tokens: {e}");
            }
        }
    }

    /// Runs a step and copies its logits to `out` (`[rows × vocab]`, rows per `mode`).
    pub fn step_logits(&mut self, seqs: &[(SessionId, &[u32])], mode: LogitsMode, out: &mut Vec<f32>) -> Result<()> {
        self.step_with(seqs, mode, |model, be, mem, st| model.read_logits(be, mem, st, out))
    }

    /// Runs a step and picks each sequence's next token on the device (`params` per sequence).
    pub fn step_sample(
        &mut self,
        seqs: &[(SessionId, &[u32])],
        params: &[SampleParams],
        out: &mut Vec<u32>,
    ) -> Result<()> {
        self.step_with(seqs, LogitsMode::Last, |model, be, mem, st| model.sample(be, mem, st, params, out))
    }

    /// [`Engine::step_sample`] that also copies each sequence's last-position logits to
    /// `logits` (`[seqs × vocab]`) before sampling.
    pub fn step_sample_logits(
        &mut self,
        seqs: &[(SessionId, &[u32])],
        params: &[SampleParams],
        out: &mut Vec<u32>,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        self.step_with(seqs, LogitsMode::Last, |model, be, mem, st| {
            model.read_logits(be, mem, st, logits)?;
            model.sample(be, mem, st, params, out)
        })
    }

    /// Feeds `tokens` to a session in chunks of at most the step limit; returns the logits of
    /// every position when `all`, else of the last one.
    pub fn prefill(&mut self, id: SessionId, tokens: &[u32], all: bool, out: &mut Vec<f32>) -> Result<()> {
        // Check the whole prompt first: a refused prompt must leave the session unchanged.
        let start = self.vmu.session_tokens(id)?;
        if start + tokens.len() > self.max_context_tokens {
            return Err(ModelError::TooLong { tokens: start + tokens.len(), max: self.max_context_tokens });
        }
        self.model.cfg.check_tokens(tokens, start)?;
        let chunk = if all { self.all_logits_rows() } else { self.max_step_tokens() };
        out.clear();
        let mut buf = Vec::new();
        let mode = if all { LogitsMode::All } else { LogitsMode::Last };
        for (i, part) in tokens.chunks(chunk).enumerate() {
            let last = (i + 1) * chunk >= tokens.len();
            if all || last {
                self.step_logits(&[(id, part)], mode, &mut buf)?;
                out.extend_from_slice(&buf);
            } else {
                self.step_logits(&[(id, part)], LogitsMode::Last, &mut buf)?;
            }
        }
        Ok(())
    }
}

/// Checks at start-up that the largest step fits the backend's per-stream workspace (`ws`,
/// [`Backend::step_workspace_bytes`]): with
/// 16-bit weights every GEMM stages its f32 activations (`max_step_tokens` rows × the widest
/// input) there, and sampling sorts a vocabulary-sized slot per row. A step limit too large is
/// refused here with the numbers, instead of failing steps midway.
fn check_step_workspace(ws: Option<usize>, cfg: &ModelConfig, dtype: DType, max_step_tokens: usize) -> Result<()> {
    let Some(ws) = ws else { return Ok(()) };
    if dtype != DType::F32 {
        let k = cfg.hidden_size.max(cfg.intermediate_size).max(cfg.heads * cfg.head_dim);
        let bytes = max_step_tokens.saturating_mul(k).saturating_mul(dtype.size_bytes());
        if bytes > ws {
            return Err(ModelError::Memory(format!(
                "max_step_tokens {max_step_tokens}: a step's {dtype} activations ({max_step_tokens} × {k} = {bytes} \
                 bytes) exceed the backend's {ws}-byte workspace; use at most {} step tokens",
                ws / (k * dtype.size_bytes())
            )));
        }
    }
    let slot = cfg.vocab_size.next_power_of_two().saturating_mul(8);
    if slot > ws {
        return Err(ModelError::Memory(format!(
            "vocabulary {}: one sampling row needs {slot} bytes, more than the backend's {ws}-byte workspace",
            cfg.vocab_size
        )));
    }
    Ok(())
}

/// A step's memory: the weights at `weights_base` under the engine's lease, the paged KV cache,
/// and `scratch_bytes` of scratch taken from this step's arena (released by `end_step`).
fn step_memory<'p, B: Backend>(
    parts: &mut djinn_vmu::StepParts<'p, B>,
    weights_base: usize,
    scratch_bytes: usize,
) -> Result<StepMemory<'p, B>> {
    let scratch_base = parts.scratch.alloc(scratch_bytes, 256).map_err(djinn_vmu::VmuError::from)?;
    Ok(StepMemory {
        stream: parts.backend.default_stream(),
        weights: parts.region,
        weights_base,
        kv: parts.kv,
        scratch: parts.region,
        scratch_base,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use djinn_backend::cpu::CpuBackend;

    const GREEDY: SampleParams = SampleParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, step: 0 };

    fn engine(kv_capacity_bytes: Option<usize>) -> Engine<CpuBackend> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/models/llama-gqa");
        let be = Arc::new(CpuBackend::with_threads(1).unwrap());
        let opts = EngineOptions {
            max_sessions: 4,
            max_step_tokens: 64,
            kv_capacity_bytes,
            host_swap_bytes: Some(1 << 20),
            ..EngineOptions::default()
        };
        Engine::load_dir(be, &dir, &opts).unwrap()
    }

    /// Three sessions stepped together and in turns: identical tokens with KV for one session
    /// (swapping) and without pressure; a batch that cannot fit fails leaving every session intact.
    #[test]
    fn oversubscribed_kv_swaps_and_keeps_tokens() {
        let run = |eng: &mut Engine<CpuBackend>| -> (Vec<Vec<u32>>, Vec<SessionId>) {
            let ids: Vec<SessionId> = (0..3).map(|_| eng.open_session().unwrap()).collect();
            let mut last: Vec<u32> = vec![10, 20, 30];
            let mut out = vec![Vec::new(); 3];
            let mut sampled = Vec::new();
            for step in 0..40 {
                // Alone in turns (each fits), so the others are swapped out and back.
                let i = step % 3;
                if !eng.batch_fits(&[(ids[i], 1)]) {
                    panic!("one session must always fit");
                }
                eng.step_sample(&[(ids[i], &[last[i]])], &[GREEDY], &mut sampled).unwrap();
                last[i] = sampled[0];
                out[i].push(sampled[0]);
            }
            (out, ids)
        };
        let mut free = engine(None);
        let (want, _) = run(&mut free);
        // KV of two 16-token blocks; each session (≤ 14 tokens) holds one: three cannot be resident.
        let block = free.vmu().layout().block_bytes();
        let mut tight = engine(Some(2 * block));
        let (got, ids) = run(&mut tight);
        assert_eq!(got, want);
        assert!(tight.vmu().metrics().swap_out_total.get() > 0);
        let st = tight.vmu().stats();
        assert!(st.kv_used_bytes_peak <= 2 * block);
        // All three in one step need three blocks: refused up front, and by the step itself.
        let before: Vec<usize> = ids.iter().map(|&s| tight.session_tokens(s).unwrap()).collect();
        assert!(!tight.batch_fits(&[(ids[0], 1), (ids[1], 1), (ids[2], 1)]));
        let toks = [1u32];
        let all: Vec<(SessionId, &[u32])> = ids.iter().map(|&s| (s, &toks[..])).collect();
        let mut sampled = Vec::new();
        assert!(tight.step_sample(&all, &[GREEDY; 3], &mut sampled).is_err());
        let after: Vec<usize> = ids.iter().map(|&s| tight.session_tokens(s).unwrap()).collect();
        assert_eq!(before, after, "a refused step changed a session");
    }

    /// Preemption by recomputation: a session's KV dropped mid-generation and rebuilt by feeding
    /// its tokens again in chunks (13 rows: the batched path, unlike the decode steps that made
    /// most of it) gives bit-identical logits and tokens for every later step, with another
    /// session stepping beside it in some steps (batch composition varies too).
    #[test]
    fn recomputed_kv_is_bit_exact() {
        let run = |preempt_at: Option<usize>| -> (Vec<u32>, Vec<u32>) {
            let mut eng = engine(None);
            let (a, b) = (eng.open_session().unwrap(), eng.open_session().unwrap());
            let mut toks: Vec<u32> = (0..21).map(|i| 3 + (i * 7) % 120).collect();
            let mut lg = Vec::new();
            eng.prefill(a, &toks[..20], false, &mut lg).unwrap();
            eng.prefill(b, &[5, 6, 7], false, &mut lg).unwrap();
            let mut last_b = 8u32;
            let (mut sampled, mut logits, mut bits) = (Vec::new(), Vec::new(), Vec::new());
            let vocab = eng.config().vocab_size;
            for step in 0..30 {
                if preempt_at == Some(step) {
                    assert_eq!(eng.drop_kv(a).unwrap(), toks.len() - 1);
                    assert_eq!(eng.session_tokens(a).unwrap(), 0);
                    for chunk in toks[..toks.len() - 1].chunks(13) {
                        eng.step_logits(&[(a, chunk)], LogitsMode::Last, &mut lg).unwrap();
                    }
                }
                let (pa, pb) = ([*toks.last().unwrap()], [last_b]);
                let row = if step % 2 == 0 {
                    eng.step_sample_logits(&[(a, &pa)], &[GREEDY], &mut sampled, &mut logits).unwrap();
                    0
                } else {
                    eng.step_sample_logits(&[(b, &pb), (a, &pa)], &[GREEDY; 2], &mut sampled, &mut logits).unwrap();
                    last_b = sampled[0];
                    1
                };
                toks.push(sampled[row]);
                bits.extend(logits[row * vocab..(row + 1) * vocab].iter().map(|f| f.to_bits()));
            }
            (toks, bits)
        };
        let (want_toks, want_bits) = run(None);
        for at in [1, 12, 29] {
            let (toks, bits) = run(Some(at));
            assert_eq!(toks, want_toks, "tokens after a preemption at step {at}");
            assert!(bits == want_bits, "logits after a preemption at step {at} differ in their bits");
        }
    }

    /// SmolLM2-135M's shapes (hidden 576, intermediate 1536) against a 32 MiB workspace: bf16
    /// weights admit 10922 step tokens, not more; f32 weights need no staging.
    #[test]
    fn step_limits_are_checked_at_start_up() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/models/llama-gqa");
        let mut cfg = ModelConfig::load(&dir).unwrap();
        (cfg.hidden_size, cfg.intermediate_size, cfg.heads, cfg.head_dim, cfg.vocab_size) = (576, 1536, 9, 64, 49152);
        let ws = Some(32 << 20);
        assert!(check_step_workspace(ws, &cfg, DType::BF16, 10922).is_ok());
        let e = check_step_workspace(ws, &cfg, DType::BF16, 10923).unwrap_err().to_string();
        assert!(e.contains("use at most 10922 step tokens"), "{e}");
        assert!(check_step_workspace(ws, &cfg, DType::F32, 1 << 20).is_ok());
        assert!(check_step_workspace(None, &cfg, DType::BF16, 1 << 20).is_ok());
        cfg.vocab_size = 8 << 20;
        assert!(check_step_workspace(ws, &cfg, DType::F32, 1).is_err());
    }

    /// A step that fails after every session grew (here: reading its results) leaves every
    /// session as it was, and stepping on gives the tokens of a run where it never happened.
    #[test]
    fn failed_step_changes_no_session() {
        let run = |fail_at: Option<usize>| -> Vec<Vec<u32>> {
            let mut eng = engine(None);
            let ids: Vec<SessionId> = (0..3).map(|_| eng.open_session().unwrap()).collect();
            // Different lengths, so a shifted position would change the tokens.
            let prompts: [&[u32]; 3] =
                [&[5, 6, 7], &[9], &[11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27]];
            let mut last = Vec::new();
            for (i, p) in prompts.iter().enumerate() {
                let mut lg = Vec::new();
                eng.prefill(ids[i], &p[..p.len() - 1], false, &mut lg).unwrap();
                last.push(*p.last().unwrap());
            }
            let mut out = vec![Vec::new(); 3];
            let mut sampled = Vec::new();
            for step in 0..6 {
                let seqs: Vec<(SessionId, Vec<u32>)> = (0..3).map(|i| (ids[i], vec![last[i]])).collect();
                let view: Vec<(SessionId, &[u32])> = seqs.iter().map(|(s, t)| (*s, &t[..])).collect();
                if fail_at == Some(step) {
                    let before: Vec<usize> = ids.iter().map(|&s| eng.session_tokens(s).unwrap()).collect();
                    let r: Result<()> = eng.step_with(&view, LogitsMode::Last, |_, _, _, _| {
                        Err(ModelError::Batch("injected failure after the forward pass".into()))
                    });
                    assert!(r.is_err());
                    let after: Vec<usize> = ids.iter().map(|&s| eng.session_tokens(s).unwrap()).collect();
                    assert_eq!(before, after, "a failed step grew a session");
                    eng.vmu().check_invariants();
                }
                eng.step_sample(&view, &[GREEDY; 3], &mut sampled).unwrap();
                for i in 0..3 {
                    last[i] = sampled[i];
                    out[i].push(sampled[i]);
                }
            }
            out
        };
        let want = run(None);
        for at in [0, 3] {
            assert_eq!(run(Some(at)), want, "failure injected at step {at}");
        }
    }

    /// Batch invariance end to end (preemption by recomputation relies on it): a prompt fed as
    /// one prefill and the same tokens fed one decode step at a time — each step batched beside
    /// another session's prefill chunk — give bit-identical logits for every position, and the
    /// next step over the two caches gives bit-identical logits (so the K/V it attends over are
    /// the same bits). f32 and bf16 weights.
    #[test]
    fn prefill_and_decode_steps_give_identical_bits() {
        for dtype in [None, Some(DType::BF16)] {
            let mk = || {
                let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/models/llama-gqa");
                let be = Arc::new(CpuBackend::with_threads(2).unwrap());
                let opts = EngineOptions {
                    dtype,
                    max_sessions: 4,
                    max_step_tokens: 64,
                    all_logits: true,
                    ..Default::default()
                };
                Engine::load_dir(be, &dir, &opts).unwrap()
            };
            let toks: Vec<u32> = (0..37u32).map(|i| (i * 29 + 3) % 128).collect();
            let (mut a, mut b) = (mk(), mk());
            let sa = a.open_session().unwrap();
            let mut la = Vec::new();
            a.prefill(sa, &toks, true, &mut la).unwrap();
            let (sb, other) = (b.open_session().unwrap(), b.open_session().unwrap());
            let vocab = la.len() / toks.len();
            let mut lb = Vec::new();
            let mut row = Vec::new();
            let filler: Vec<u32> = (0..20u32).map(|i| (i * 13 + 5) % 128).collect();
            for (i, t) in toks.iter().enumerate() {
                let seqs: Vec<(SessionId, &[u32])> = match i {
                    // Beside another session's prefill chunk (different rows in the same GEMMs).
                    0 | 5 | 11 => vec![(sb, std::slice::from_ref(t)), (other, &filler[..4])],
                    _ => vec![(sb, std::slice::from_ref(t))],
                };
                b.step_logits(&seqs, LogitsMode::Last, &mut row).unwrap();
                lb.extend_from_slice(&row[..vocab]);
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            assert_eq!(bits(&la), bits(&lb), "{dtype:?}: prefill and decode steps differ");
            let (mut na, mut nb) = (Vec::new(), Vec::new());
            a.step_logits(&[(sa, &[7])], LogitsMode::Last, &mut na).unwrap();
            b.step_logits(&[(sb, &[7])], LogitsMode::Last, &mut nb).unwrap();
            assert_eq!(bits(&na), bits(&nb), "{dtype:?}: the caches differ");
        }
    }

    /// Swap victims by (rank, recency): a batch-ranked session is swapped out before a
    /// realtime-ranked one that was stepped longer ago; with equal ranks, the least recent goes.
    #[test]
    fn swap_victims_by_rank_then_recency() {
        use djinn_vmu::Residency;
        for (rank_a, rank_b, swapped_is_a) in [(0, 2, true), (1, 1, false)] {
            let block = engine(None).vmu().layout().block_bytes();
            let mut eng = engine(Some(2 * block));
            let (a, b, c) = (eng.open_session().unwrap(), eng.open_session().unwrap(), eng.open_session().unwrap());
            eng.set_swap_rank(a, rank_a).unwrap();
            eng.set_swap_rank(b, rank_b).unwrap();
            let mut out = Vec::new();
            // b stepped first (least recent), then a; each holds one of the two blocks.
            eng.step_sample(&[(b, &[3])], &[GREEDY], &mut out).unwrap();
            eng.step_sample(&[(a, &[4])], &[GREEDY], &mut out).unwrap();
            eng.step_sample(&[(c, &[5])], &[GREEDY], &mut out).unwrap();
            let (ra, rb) = (eng.vmu().residency(a).unwrap(), eng.vmu().residency(b).unwrap());
            let want = if swapped_is_a {
                (Residency::Swapped, Residency::Resident)
            } else {
                (Residency::Resident, Residency::Swapped)
            };
            assert_eq!((ra, rb), want, "ranks a={rank_a} b={rank_b}");
        }
    }
}
