//! A model served from one device: the VMU (weights lease, paged KV, scratch) plus the model,
//! with session-level calls — open, step a ragged batch, read logits or sampled ids, close.
//!
//! This is what the CLI runs in-process and what a server scheduler drives: [`Engine::step`]
//! takes any mix of sessions with any number of new tokens each (prefill and decode together).
//! Per step the VMU pins the sessions, appends their positions (taking blocks), the model runs
//! over the VMU's block tables, and the scratch arena is reset at the end.

use std::path::Path;
use std::sync::Arc;

use djinn_backend::{Backend, DType, SampleParams};
use djinn_vmu::{SessionId, Vmu, VmuConfig, WeightsLease, MIB};

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::forward::{LogitsMode, Model, SeqStep, StepLimits, StepMemory};
use crate::weights::WeightLayout;

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
}

impl<B: Backend> Engine<B> {
    /// Loads `dir` (config.json + safetensors) onto `backend`.
    pub fn load_dir(backend: Arc<B>, dir: &Path, opts: &EngineOptions) -> Result<Self> {
        let cfg = ModelConfig::load(dir)?;
        let ck = Checkpoint::open(dir)?;
        Self::from_checkpoint(backend, &ck, cfg, opts)
    }

    /// Validates every tensor, reserves the VMU sized for this model and `opts`, and uploads the
    /// weights once.
    pub fn from_checkpoint(backend: Arc<B>, ck: &Checkpoint, cfg: ModelConfig, opts: &EngineOptions) -> Result<Self> {
        let dtype = WeightLayout::choose_dtype(ck, opts.dtype)?;
        let layout = WeightLayout::validate(ck, &cfg, dtype)?;
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
                opts.max_step_tokens.max(opts.max_sessions)
            } else {
                opts.max_sessions
            },
        };
        let model_probe = Model::new(cfg.clone(), layout.clone(), limits, opts.block_tokens);
        let kv_tokens = opts.kv_tokens.unwrap_or(opts.max_sessions * max_blocks * opts.block_tokens);
        let mut vcfg = VmuConfig::new(kv_layout);
        // Weights plus one granule of slack for the allocator's rounding.
        vcfg.weights_bytes = layout.total_bytes + 4096;
        vcfg.kv_capacity_bytes = Some(kv_tokens.div_ceil(opts.block_tokens) * kv_layout.block_bytes());
        vcfg.scratch_bytes = model_probe.scratch.bytes() + 4096;
        vcfg.max_sessions = opts.max_sessions;
        vcfg.max_context_tokens = max_blocks * opts.block_tokens;
        vcfg.max_persistent_allocations = 16;
        // In-process use never oversubscribes KV (it is sized for every session at full length),
        // so the swap pool only needs to exist.
        vcfg.host_swap_bytes = Some(kv_layout.block_bytes());
        vcfg.swap_staging_bytes = kv_layout.block_bytes().max(MIB);
        let registry = djinn_vmu::prometheus::Registry::new();
        let vmu = Vmu::new(backend.clone(), vcfg, &registry)?;
        let name = ck.dir().display().to_string();
        let lease = vmu.alloc_weights(&name, layout.total_bytes)?;
        let layout = if lease.is_fresh() {
            WeightLayout::upload(ck, &cfg, dtype, &*backend, vmu.region(), lease.offset())?
        } else {
            layout
        };
        let model = Model::new(cfg, layout, limits, opts.block_tokens);
        Ok(Engine {
            backend,
            vmu,
            lease,
            model,
            max_context_tokens: max_ctx,
            slots: Vec::with_capacity(opts.max_step_tokens),
            starts: Vec::with_capacity(opts.max_sessions),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.model.cfg
    }
    pub fn model(&self) -> &Model {
        &self.model
    }
    pub fn backend(&self) -> &Arc<B> {
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

    pub fn open_session(&mut self) -> Result<SessionId> {
        Ok(self.vmu.open_session()?)
    }

    pub fn close_session(&mut self, id: SessionId) -> Result<()> {
        Ok(self.vmu.close_session(id)?)
    }

    pub fn session_tokens(&self, id: SessionId) -> Result<usize> {
        Ok(self.vmu.session_tokens(id)?)
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
        let ids: Vec<SessionId> = seqs.iter().map(|s| s.0).collect();
        self.vmu.ensure_resident(&ids)?;
        for &(id, toks) in seqs {
            self.slots.clear();
            self.vmu.append(id, toks.len(), &mut self.slots)?;
        }
        let result = (|| {
            let weights_base = self.lease.offset();
            let parts = self.vmu.step_parts();
            let scratch_base =
                parts.scratch.alloc(self.model.scratch.bytes(), 256).map_err(djinn_vmu::VmuError::from)?;
            let mut steps = Vec::with_capacity(seqs.len());
            for (i, &(id, toks)) in seqs.iter().enumerate() {
                steps.push(SeqStep { tokens: toks, start_pos: self.starts[i], block_table: parts.tables.get(id)? });
            }
            let mem = StepMemory {
                stream: parts.backend.default_stream(),
                weights: parts.region,
                weights_base,
                kv: parts.kv,
                scratch: parts.region,
                scratch_base,
            };
            let st = self.model.forward(parts.backend, &mem, &steps, mode)?;
            then(&self.model, parts.backend, &mem, &st)
        })();
        self.vmu.end_step();
        result
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

    /// Feeds `tokens` to a session in chunks of at most the step limit; returns the logits of
    /// every position when `all`, else of the last one.
    pub fn prefill(&mut self, id: SessionId, tokens: &[u32], all: bool, out: &mut Vec<f32>) -> Result<()> {
        // Check the whole prompt first: a refused prompt must leave the session unchanged.
        let start = self.vmu.session_tokens(id)?;
        if start + tokens.len() > self.max_context_tokens {
            return Err(ModelError::TooLong { tokens: start + tokens.len(), max: self.max_context_tokens });
        }
        self.model.cfg.check_tokens(tokens, start)?;
        let chunk = self.max_step_tokens();
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
