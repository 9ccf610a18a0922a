//! The Llama-family forward pass over any [`Backend`]: a batch of ragged sequences in (each with
//! its new tokens, its start position and its KV block table), logits out.
//!
//! A step is three phases — [`Model::begin`] (index upload + embedding), [`Model::layer`] once per
//! layer, [`Model::finish`] (final norm + LM head) — so a caller can stop between layers and
//! resume later: all state between phases lives in the step's scratch range and the KV cache.
//!
//! Scratch: every buffer a step uses is carved from one caller-provided range whose size
//! [`ScratchPlan::bytes`] computes from the bounds fixed at start-up ([`StepLimits`]); a step
//! larger than the bounds is an error, never a reallocation. Host-side index staging is sized
//! once too, so the per-step path allocates nothing.
//!
//! Numerics: activations and the residual stream are f32; weights stay in their storage dtype
//! (a float dtype, or GGML blocks multiplied by the backend's quantized GEMM).
//! The order of operations is transformers': `h = x + attn(norm(x))`, `h = h + mlp(norm(h))`.

use djinn_backend::{AttnBatch, Backend, DType, GemmArgs, KvCacheRef, KvLayout, SampleParams, View};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::index_upload::IndexStaging;
use crate::weights::{Mat, WeightLayout};

/// Bounds on one step, fixed at start-up; they size the scratch range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepLimits {
    /// New tokens across all sequences of one step.
    pub max_tokens: usize,
    /// Sequences in one step.
    pub max_seqs: usize,
    /// Block-table entries per sequence (context limit / block_tokens, rounded up).
    pub max_blocks_per_seq: usize,
    /// Rows of logits one step may return (`max_seqs`, or `max_tokens` to allow all positions).
    pub max_logit_rows: usize,
}

/// Which positions' logits a step produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsMode {
    /// The last new token of each sequence (generation).
    Last,
    /// Every new token (scoring, reference tests).
    All,
}

/// One sequence's part of a step.
#[derive(Clone, Copy, Debug)]
pub struct SeqStep<'a> {
    /// New token ids; at least one.
    pub tokens: &'a [u32],
    /// Tokens already in the cache for this sequence (position of `tokens[0]`).
    pub start_pos: usize,
    /// KV block ids in position order (the VMU's i32 table); must cover
    /// `start_pos + tokens.len()` positions.
    pub block_table: &'a [i32],
}

/// Byte offsets of the step's buffers inside the scratch range (relative to its base).
#[derive(Clone, Debug)]
pub struct ScratchPlan {
    limits: StepLimits,
    // i32 index arrays, contiguous so one host write uploads them all: ids, positions, slots,
    // q_start [seqs+1], ctx_lens [seqs], block_tables [seqs × max_blocks].
    idx: usize,
    idx_elems: usize,
    resid: usize,
    xn: usize,
    tmp: usize,
    qkv: usize,
    attn: usize,
    gate_up: usize,
    act: usize,
    last: usize,
    logits: usize,
    sampled: usize,
    bytes: usize,
}

const SCRATCH_ALIGN_BYTES: usize = 256;

impl ScratchPlan {
    pub fn new(cfg: &ModelConfig, limits: StepLimits) -> ScratchPlan {
        let t = limits.max_tokens;
        let s = limits.max_seqs;
        let (h, qd, kvd, inter, v) =
            (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size, cfg.vocab_size);
        let mut cursor = 0usize;
        let mut take = |bytes: usize| {
            let off = cursor;
            cursor = (cursor + bytes).next_multiple_of(SCRATCH_ALIGN_BYTES);
            off
        };
        let idx_elems = 3 * t + (s + 1) + s + s * limits.max_blocks_per_seq;
        let idx = take(idx_elems * 4);
        let resid = take(t * h * 4);
        let xn = take(t * h * 4);
        let tmp = take(t * h * 4);
        let qkv = take(t * (qd + 2 * kvd) * 4);
        let attn = take(t * qd * 4);
        let gate_up = take(t * 2 * inter * 4);
        let act = take(t * inter * 4);
        let last = take(s * h * 4);
        let logits = take(limits.max_logit_rows * v * 4);
        let sampled = take(limits.max_logit_rows.max(s) * 4);
        ScratchPlan {
            limits,
            idx,
            idx_elems,
            resid,
            xn,
            tmp,
            qkv,
            attn,
            gate_up,
            act,
            last,
            logits,
            sampled,
            bytes: cursor,
        }
    }

    /// Bytes of scratch one step needs.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn limits(&self) -> StepLimits {
        self.limits
    }
}

/// The memory a step runs in. The weights range is shared by every session; the KV cache is
/// the paged pool; scratch is this step's private range of `plan.bytes()`.
pub struct StepMemory<'a, B: Backend> {
    pub stream: &'a B::Stream,
    pub weights: &'a B::Region,
    pub weights_base: usize,
    pub kv: KvCacheRef<'a, B>,
    pub scratch: &'a B::Region,
    pub scratch_base: usize,
}

/// Host-side state of a step in flight, between its phases.
#[derive(Debug)]
pub struct StepState {
    tokens: usize,
    seqs: usize,
    mode: LogitsMode,
    max_q_len: usize,
    max_ctx_len: usize,
    /// Row index (in the step's token rows) of each sequence's last token.
    last_rows: Vec<usize>,
    next_layer: usize,
    /// Whether the residual buffer holds the whole hidden state (the last MLP output already
    /// added): after [`Model::read_hidden`] or [`Model::write_hidden`]. Otherwise that add is
    /// fused into the next norm, as in an uninterrupted pass.
    resid_full: bool,
}

impl StepState {
    /// Rows of logits [`Model::finish`] produces.
    pub fn logit_rows(&self) -> usize {
        match self.mode {
            LogitsMode::Last => self.seqs,
            LogitsMode::All => self.tokens,
        }
    }
    pub fn next_layer(&self) -> usize {
        self.next_layer
    }
    /// New tokens of the step (rows of the hidden state).
    pub fn tokens(&self) -> usize {
        self.tokens
    }
}

/// A loaded model: its configuration, where its weights live, and its step bounds.
#[derive(Debug)]
pub struct Model {
    pub cfg: ModelConfig,
    pub weights: WeightLayout,
    pub scratch: ScratchPlan,
    block_tokens: usize,
    /// Host staging for the index arrays (capacity fixed at construction), with the mirror
    /// that lets a step upload only the block-table entries that changed.
    staging: std::sync::Mutex<IndexStaging>,
}

impl Model {
    pub fn new(cfg: ModelConfig, weights: WeightLayout, limits: StepLimits, block_tokens: usize) -> Model {
        let scratch = ScratchPlan::new(&cfg, limits);
        let table_elems = limits.max_seqs * limits.max_blocks_per_seq;
        let staging = std::sync::Mutex::new(IndexStaging::new(scratch.idx_elems, table_elems, limits.max_seqs));
        Model { cfg, weights, scratch, block_tokens, staging }
    }

    /// The KV layout this model needs, with `block_tokens` per block and cache dtype `dtype`.
    pub fn kv_layout(cfg: &ModelConfig, block_tokens: usize, dtype: DType) -> KvLayout {
        KvLayout { layers: cfg.layers, kv_heads: cfg.kv_heads, head_dim: cfg.head_dim, block_tokens, dtype }
    }

    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    fn f32_view<'a, B: Backend>(&self, m: &StepMemory<'a, B>, off: usize, len: usize) -> View<'a, B> {
        View::new(m.scratch, m.scratch_base + off, DType::F32, len)
    }

    fn w<'a, B: Backend>(&self, m: &StepMemory<'a, B>, off: usize, len: usize) -> View<'a, B> {
        View::new(m.weights, m.weights_base + off, self.weights.dtype, len)
    }

    /// Matrix `mat` of `n` rows of `k` as an operand: `U8` bytes when quantized.
    fn mat<'a, B: Backend>(&self, m: &StepMemory<'a, B>, mat: Mat, n: usize, k: usize) -> View<'a, B> {
        match mat.quant {
            Some(_) => View::new(m.weights, m.weights_base + mat.offset, DType::U8, mat.bytes(DType::U8, n, k)),
            None => self.w(m, mat.offset, n * k),
        }
    }

    fn idx_view<'a, B: Backend>(&self, m: &StepMemory<'a, B>, first: usize, len: usize) -> View<'a, B> {
        View::new(m.scratch, m.scratch_base + self.scratch.idx + first * 4, DType::I32, len)
    }

    /// Validates the batch, uploads its index arrays and embeds its tokens.
    pub fn begin<B: Backend>(
        &self,
        be: &B,
        m: &StepMemory<'_, B>,
        seqs: &[SeqStep<'_>],
        mode: LogitsMode,
    ) -> Result<StepState> {
        self.begin_at(be, m, seqs, mode, 0)
    }

    /// [`Model::begin`] for a pass that resumes after `from_layer` layers (0 = from the
    /// embedding): the index arrays are uploaded, the embedding is skipped, and the caller must
    /// put the hidden state in place with [`Model::write_hidden`] before the next layer. The KV
    /// of layers below `from_layer` for these tokens must already be in the cache (written by the
    /// part of the pass that stopped there).
    pub fn begin_at<B: Backend>(
        &self,
        be: &B,
        m: &StepMemory<'_, B>,
        seqs: &[SeqStep<'_>],
        mode: LogitsMode,
        from_layer: usize,
    ) -> Result<StepState> {
        if from_layer > self.cfg.layers {
            return Err(ModelError::Batch(format!("resume after layer {from_layer} of {}", self.cfg.layers)));
        }
        let lim = self.scratch.limits;
        let tokens: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        if seqs.is_empty() || seqs.len() > lim.max_seqs {
            return Err(ModelError::Batch(format!("{} sequences (1..={} allowed)", seqs.len(), lim.max_seqs)));
        }
        if tokens > lim.max_tokens {
            return Err(ModelError::Batch(format!("{tokens} tokens exceed the step limit of {}", lim.max_tokens)));
        }
        let rows = if mode == LogitsMode::All { tokens } else { seqs.len() };
        if rows > lim.max_logit_rows {
            return Err(ModelError::Batch(format!("{rows} logit rows exceed the limit of {}", lim.max_logit_rows)));
        }
        if m.kv.layout != Model::kv_layout(&self.cfg, self.block_tokens, m.kv.layout.dtype) {
            return Err(ModelError::Batch(format!("KV layout {:?} does not fit this model", m.kv.layout)));
        }
        let bt = self.block_tokens;
        let (t, s, mb) = (lim.max_tokens, lim.max_seqs, lim.max_blocks_per_seq);
        let mut last_rows = Vec::with_capacity(seqs.len());
        let (mut max_q_len, mut max_ctx_len) = (0, 0);
        let mut guard = self.staging.lock().unwrap_or_else(|p| p.into_inner());
        let staging = &mut *guard;
        staging.row_blocks.clear();
        let st = &mut staging.next;
        // Sections of the index block: ids [t], positions [t], slots [t], q_start [s+1],
        // ctx_lens [s], block_tables [s, mb].
        let (pos0, slot0, qs0, ctx0, bt0) = (t, 2 * t, 3 * t, 3 * t + s + 1, 3 * t + 2 * s + 1);
        // The head is uploaded whole, zero past this step's rows. A table row is read (and
        // uploaded) only up to its sequence's blocks (`row_blocks`), each written below, so the
        // rest is not cleared: that was a memset of max_seqs × max_blocks_per_seq entries per
        // step (130 KiB for 65 sessions of SmolLM2's 8192 positions).
        st.resize(self.scratch.idx_elems, 0);
        st[..bt0].fill(0);
        let mut row = 0usize;
        for (i, sq) in seqs.iter().enumerate() {
            if sq.tokens.is_empty() {
                return Err(ModelError::Batch(format!("sequence {i} has no new tokens")));
            }
            self.cfg.check_tokens(sq.tokens, sq.start_pos)?;
            let ctx = sq.start_pos + sq.tokens.len();
            let blocks = ctx.div_ceil(bt);
            if sq.block_table.len() < blocks || blocks > mb {
                return Err(ModelError::Batch(format!(
                    "sequence {i}: {ctx} positions need {blocks} blocks; table has {} (limit {mb})",
                    sq.block_table.len()
                )));
            }
            if let Some(&b) = sq.block_table[..blocks].iter().find(|&&b| b < 0 || b as usize >= m.kv.num_blocks) {
                return Err(ModelError::Batch(format!("sequence {i}: block {b} outside the cache")));
            }
            st[qs0 + i] = row as i32;
            for (j, &tok) in sq.tokens.iter().enumerate() {
                let p = sq.start_pos + j;
                st[row] = tok as i32;
                st[pos0 + row] = p as i32;
                st[slot0 + row] = (sq.block_table[p / bt] as usize * bt + p % bt) as i32;
                row += 1;
            }
            st[ctx0 + i] = ctx as i32;
            st[bt0 + i * mb..][..blocks].copy_from_slice(&sq.block_table[..blocks]);
            staging.row_blocks.push(blocks);
            last_rows.push(row - 1);
            max_q_len = max_q_len.max(sq.tokens.len());
            max_ctx_len = max_ctx_len.max(ctx);
        }
        st[qs0 + seqs.len()] = row as i32;
        staging.upload(be, m.scratch, m.scratch_base + self.scratch.idx, bt0, mb)?;
        drop(guard);

        let st = StepState {
            tokens,
            seqs: seqs.len(),
            mode,
            max_q_len,
            max_ctx_len,
            last_rows,
            next_layer: from_layer,
            resid_full: from_layer > 0,
        };
        if from_layer > 0 {
            return Ok(st);
        }
        let h = self.cfg.hidden_size;
        let emb = self.weights.embed;
        let table = self.mat(m, emb, self.cfg.vocab_size, h);
        let (ids, out) = (self.idx_view(m, 0, tokens), self.f32_view(m, self.scratch.resid, tokens * h));
        match emb.quant {
            Some(q) => be.embedding_quant(m.stream, table, q, ids, out, h)?,
            None => be.embedding(m.stream, table, ids, out, h)?,
        }
        Ok(st)
    }

    /// Copies the hidden state after `st.next_layer()` layers — the residual stream, `[tokens,
    /// hidden]` f32, row-major, before the final norm when every layer ran — to `out`. The add
    /// an uninterrupted pass fuses into the next norm happens here instead, with the same
    /// operands, so the pass continues bit for bit.
    pub fn read_hidden<B: Backend>(
        &self,
        be: &B,
        m: &StepMemory<'_, B>,
        st: &mut StepState,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        if st.next_layer == 0 {
            return Err(ModelError::Batch("no hidden state before the first layer".into()));
        }
        let n = st.tokens * self.cfg.hidden_size;
        let resid = self.f32_view(m, self.scratch.resid, n);
        if !st.resid_full {
            let tmp = self.f32_view(m, self.scratch.tmp, n);
            be.binary(m.stream, djinn_backend::BinaryOp::Add, resid, tmp, resid)?;
            st.resid_full = true;
        }
        be.sync_stream(m.stream)?;
        out.resize(n, 0.0);
        be.read(m.scratch, resid.offset, f32_bytes_mut(out))?;
        Ok(())
    }

    /// Replaces the hidden state after `st.next_layer()` layers with `hidden` (`[tokens,
    /// hidden]` f32, row-major); the next layer (or the final norm) reads it.
    pub fn write_hidden<B: Backend>(
        &self,
        be: &B,
        m: &StepMemory<'_, B>,
        st: &mut StepState,
        hidden: &[f32],
    ) -> Result<()> {
        let n = st.tokens * self.cfg.hidden_size;
        if st.next_layer == 0 || hidden.len() != n {
            return Err(ModelError::Batch(format!(
                "hidden state of {} values after layer {}; {} tokens × {} expected after a layer",
                hidden.len(),
                st.next_layer,
                st.tokens,
                self.cfg.hidden_size
            )));
        }
        // Kernels queued earlier may still read the residual buffer.
        be.sync_stream(m.stream)?;
        be.write(m.scratch, m.scratch_base + self.scratch.resid, f32_bytes(hidden))?;
        st.resid_full = true;
        Ok(())
    }

    /// `c[rows, n] = a[rows, k] · w[n, k]ᵀ (+ bias)`.
    #[allow(clippy::too_many_arguments)]
    fn linear<B: Backend>(
        &self,
        be: &B,
        m: &StepMemory<'_, B>,
        a: View<'_, B>,
        w: Mat,
        bias: Option<usize>,
        c: View<'_, B>,
        rows: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let wv = self.mat(m, w, n, k);
        match w.quant {
            Some(q) => be.gemm_quant(m.stream, a, wv, q, c, rows, n, k)?,
            None => be.gemm(m.stream, a, wv, c, &GemmArgs::model_linear(rows, n, k))?,
        }
        if let Some(b) = bias {
            be.binary(m.stream, djinn_backend::BinaryOp::Add, c, self.w(m, b, n), c)?;
        }
        Ok(())
    }

    /// `c` = `parts` back-to-back `[rows, n]` outputs, part `i` = `a[rows, k] · w_iᵀ` where the
    /// weights `w_i` (`n` rows of `k` each) lie back to back from `w` in one float dtype: one
    /// batched GEMM over the shared activations (a backend may run it as one parallel region;
    /// every element is computed as by [`Model::linear`] of its part). Biases are the caller's.
    #[allow(clippy::too_many_arguments)]
    fn linear_group<B: Backend>(
        &self,
        be: &B,
        m: &StepMemory<'_, B>,
        a: View<'_, B>,
        w: Mat,
        parts: usize,
        c: View<'_, B>,
        rows: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let wv = self.w(m, w.offset, parts * n * k);
        let args = GemmArgs {
            batch: parts,
            stride_a: 0,
            stride_b: n * k,
            stride_c: rows * n,
            ..GemmArgs::model_linear(rows, n, k)
        };
        be.gemm(m.stream, a, wv, c, &args)?;
        Ok(())
    }

    /// Whether the equal row blocks `parts` (`n` rows of `k` each) can be multiplied as one
    /// group ([`Model::linear_group`]): float weights, back to back (at most four parts).
    fn grouped(&self, parts: &[Mat], n: usize, k: usize) -> bool {
        parts.iter().all(|p| p.quant.is_none()) && self.fused(parts, &[n; 3], k)
    }

    /// Whether the row blocks `parts` (of `rows[i]` rows of `k`) form one matrix: one storage
    /// type, back to back.
    fn fused(&self, parts: &[Mat], rows: &[usize], k: usize) -> bool {
        let dt = self.weights.dtype;
        parts
            .windows(2)
            .zip(rows)
            .all(|(w, &r)| w[0].quant == w[1].quant && w[0].offset + w[0].bytes(dt, r, k) == w[1].offset)
    }

    /// Runs layer `st.next_layer()` and advances it.
    pub fn layer<B: Backend>(&self, be: &B, m: &StepMemory<'_, B>, st: &mut StepState) -> Result<()> {
        let l = st.next_layer;
        if l >= self.cfg.layers {
            return Err(ModelError::Batch(format!("layer {l} past the last ({})", self.cfg.layers)));
        }
        let c = &self.cfg;
        let lw = &self.weights.layers[l];
        let es = self.weights.dtype.size_bytes();
        let t = st.tokens;
        let (h, qd, kvd, inter, hd) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size, c.head_dim);
        let sp = &self.scratch;
        let resid = self.f32_view(m, sp.resid, t * h);
        let xn = self.f32_view(m, sp.xn, t * h);
        let tmp = self.f32_view(m, sp.tmp, t * h);

        // Pre-attention norm; from layer 1 on it also adds the previous MLP output to the residual.
        let ln_in = self.w(m, lw.ln_in, h);
        if l == 0 || st.resid_full {
            be.rms_norm(m.stream, resid, None, ln_in, xn, h, c.rms_norm_eps)?;
            st.resid_full = false;
        } else {
            be.rms_norm(m.stream, tmp, Some(resid), ln_in, xn, h, c.rms_norm_eps)?;
        }

        // q, k, v. One row: one GEMV over the fused matrix. Several: one GEMM per row block so
        // each output is a contiguous [t, dim] matrix.
        let (q, k, v);
        let bias = |i: usize| lw.qkv_bias.map(|b| b + i * es);
        if t == 1 {
            let qkv = self.f32_view(m, sp.qkv, qd + 2 * kvd);
            (q, k, v) = (qkv.slice(0, qd), qkv.slice(qd, kvd), qkv.slice(qd + kvd, kvd));
            if self.fused(&lw.qkv, &[qd, kvd, kvd], h) {
                self.linear(be, m, xn, lw.qkv[0], lw.qkv_bias, qkv, 1, qd + 2 * kvd, h)?;
            } else {
                self.linear(be, m, xn, lw.qkv[0], bias(0), q, 1, qd, h)?;
                self.linear(be, m, xn, lw.qkv[1], bias(qd), k, 1, kvd, h)?;
                self.linear(be, m, xn, lw.qkv[2], bias(qd + kvd), v, 1, kvd, h)?;
            }
        } else {
            q = self.f32_view(m, sp.qkv, t * qd);
            k = self.f32_view(m, sp.qkv + t * qd * 4, t * kvd);
            v = self.f32_view(m, sp.qkv + t * (qd + kvd) * 4, t * kvd);
            self.linear(be, m, xn, lw.qkv[0], bias(0), q, t, qd, h)?;
            if self.grouped(&lw.qkv[1..], kvd, h) {
                let kv = self.f32_view(m, sp.qkv + t * qd * 4, 2 * t * kvd);
                self.linear_group(be, m, xn, lw.qkv[1], 2, kv, t, kvd, h)?;
                for (i, out) in [(1, k), (2, v)] {
                    if let Some(b) = bias(qd + (i - 1) * kvd) {
                        be.binary(m.stream, djinn_backend::BinaryOp::Add, out, self.w(m, b, kvd), out)?;
                    }
                }
            } else {
                self.linear(be, m, xn, lw.qkv[1], bias(qd), k, t, kvd, h)?;
                self.linear(be, m, xn, lw.qkv[2], bias(qd + kvd), v, t, kvd, h)?;
            }
        }
        let positions = self.idx_view(m, sp.limits.max_tokens, t);
        let slots = self.idx_view(m, 2 * sp.limits.max_tokens, t);
        let inv_freq = View::new(m.weights, m.weights_base + self.weights.inv_freq, DType::F32, hd / 2);
        if t == 1 {
            // q and k are adjacent in the fused output: one rotation over all their heads.
            let qk = self.f32_view(m, sp.qkv, qd + kvd);
            be.rope(m.stream, qk, positions, inv_freq, c.heads + c.kv_heads, hd)?;
        } else {
            be.rope(m.stream, q, positions, inv_freq, c.heads, hd)?;
            be.rope(m.stream, k, positions, inv_freq, c.kv_heads, hd)?;
        }
        be.kv_append(m.stream, k, v, &m.kv, l, slots)?;

        let lim = sp.limits;
        let qs0 = 3 * lim.max_tokens;
        let batch = AttnBatch {
            seqs: st.seqs,
            q_start: self.idx_view(m, qs0, st.seqs + 1),
            ctx_lens: self.idx_view(m, qs0 + lim.max_seqs + 1, st.seqs),
            block_tables: self.idx_view(m, qs0 + 2 * lim.max_seqs + 1, st.seqs * lim.max_blocks_per_seq),
            max_blocks_per_seq: lim.max_blocks_per_seq,
            max_q_len: st.max_q_len,
            max_ctx_len: st.max_ctx_len,
        };
        let attn = self.f32_view(m, sp.attn, t * qd);
        be.attention(m.stream, q, &m.kv, l, &batch, attn, c.heads, 1.0 / (hd as f32).sqrt())?;
        self.linear(be, m, attn, lw.o, lw.o_bias, tmp, t, h, qd)?;

        // Post-attention norm (adds the attention output to the residual), then the MLP.
        be.rms_norm(m.stream, tmp, Some(resid), self.w(m, lw.ln_post, h), xn, h, c.rms_norm_eps)?;
        let (gate, up);
        let bias = |i: usize| lw.gate_up_bias.map(|b| b + i * es);
        if t == 1 && self.fused(&lw.gate_up, &[inter, inter], h) {
            let gu = self.f32_view(m, sp.gate_up, 2 * inter);
            self.linear(be, m, xn, lw.gate_up[0], lw.gate_up_bias, gu, 1, 2 * inter, h)?;
            (gate, up) = (gu.slice(0, inter), gu.slice(inter, inter));
        } else {
            gate = self.f32_view(m, sp.gate_up, t * inter);
            up = self.f32_view(m, sp.gate_up + t * inter * 4, t * inter);
            if self.grouped(&lw.gate_up, inter, h) {
                let gu = self.f32_view(m, sp.gate_up, 2 * t * inter);
                self.linear_group(be, m, xn, lw.gate_up[0], 2, gu, t, inter, h)?;
                for (i, out) in [(0, gate), (1, up)] {
                    if let Some(b) = bias(i * inter) {
                        be.binary(m.stream, djinn_backend::BinaryOp::Add, out, self.w(m, b, inter), out)?;
                    }
                }
            } else {
                self.linear(be, m, xn, lw.gate_up[0], bias(0), gate, t, inter, h)?;
                self.linear(be, m, xn, lw.gate_up[1], bias(inter), up, t, inter, h)?;
            }
        }
        let act = self.f32_view(m, sp.act, t * inter);
        be.silu_mul(m.stream, gate, up, act)?;
        self.linear(be, m, act, lw.down, lw.down_bias, tmp, t, h, inter)?;
        st.next_layer += 1;
        Ok(())
    }

    /// Final norm and LM head: logits `[st.logit_rows(), vocab]` f32 in scratch.
    pub fn finish<B: Backend>(&self, be: &B, m: &StepMemory<'_, B>, st: &StepState) -> Result<()> {
        if st.next_layer != self.cfg.layers {
            return Err(ModelError::Batch(format!("finish after {} of {} layers", st.next_layer, self.cfg.layers)));
        }
        let (h, v, t) = (self.cfg.hidden_size, self.cfg.vocab_size, st.tokens);
        let sp = &self.scratch;
        let resid = self.f32_view(m, sp.resid, t * h);
        let xn = self.f32_view(m, sp.xn, t * h);
        let tmp = self.f32_view(m, sp.tmp, t * h);
        let (norm, eps) = (self.w(m, self.weights.norm, h), self.cfg.rms_norm_eps);
        if st.resid_full {
            be.rms_norm(m.stream, resid, None, norm, xn, h, eps)?;
        } else {
            be.rms_norm(m.stream, tmp, Some(resid), norm, xn, h, eps)?;
        }
        let rows = st.logit_rows();
        let input = if st.mode == LogitsMode::All || rows == t {
            xn
        } else {
            // Gather each sequence's last row: only those reach the (large) LM head.
            let last = self.f32_view(m, sp.last, rows * h);
            for (i, &r) in st.last_rows.iter().enumerate() {
                be.copy(m.stream, m.scratch, xn.offset + r * h * 4, m.scratch, last.offset + i * h * 4, h * 4)?;
            }
            last
        };
        let logits = self.f32_view(m, sp.logits, rows * v);
        self.linear(be, m, input, self.weights.lm_head, None, logits, rows, v, h)?;
        Ok(())
    }

    /// begin + every layer + finish.
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        m: &StepMemory<'_, B>,
        seqs: &[SeqStep<'_>],
        mode: LogitsMode,
    ) -> Result<StepState> {
        let mut st = self.begin(be, m, seqs, mode)?;
        while st.next_layer < self.cfg.layers {
            self.layer(be, m, &mut st)?;
        }
        self.finish(be, m, &st)?;
        Ok(st)
    }

    /// Copies the step's logits to the host: `out` becomes `[rows × vocab]`.
    pub fn read_logits<B: Backend>(
        &self,
        be: &B,
        m: &StepMemory<'_, B>,
        st: &StepState,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let n = st.logit_rows() * self.cfg.vocab_size;
        be.sync_stream(m.stream)?;
        out.resize(n, 0.0);
        let dst = f32_bytes_mut(out);
        be.read(m.scratch, m.scratch_base + self.scratch.logits, dst)?;
        Ok(())
    }

    /// Picks one token per logits row on the device (argmax when every row is greedy, else the
    /// backend's sampler) and returns the ids.
    pub fn sample<B: Backend>(
        &self,
        be: &B,
        m: &StepMemory<'_, B>,
        st: &StepState,
        params: &[SampleParams],
        out: &mut Vec<u32>,
    ) -> Result<()> {
        let rows = st.logit_rows();
        if params.len() != rows {
            return Err(ModelError::Batch(format!("{} sampling parameter sets for {rows} rows", params.len())));
        }
        let v = self.cfg.vocab_size;
        let logits = self.f32_view(m, self.scratch.logits, rows * v);
        let ids = View::new(m.scratch, m.scratch_base + self.scratch.sampled, DType::I32, rows);
        if params.iter().all(|p| p.temperature <= 0.0) {
            be.argmax(m.stream, logits, ids, v)?;
        } else {
            be.sample(m.stream, logits, ids, v, params)?;
        }
        be.sync_stream(m.stream)?;
        out.clear();
        out.resize(rows, 0);
        be.read(m.scratch, ids.offset, u32_bytes_mut(out))?;
        Ok(())
    }
}

fn f32_bytes_mut(xs: &mut [f32]) -> &mut [u8] {
    // SAFETY: f32 has no padding and every byte pattern written through the u8 view is a valid
    // f32; the slice covers exactly the same bytes, alignment of u8 is 1, and the exclusive
    // borrow of `xs` is carried over to the returned slice.
    unsafe { std::slice::from_raw_parts_mut(xs.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(xs)) }
}

fn f32_bytes(xs: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding; the byte slice covers exactly the same memory, alignment of u8
    // is 1, and the shared borrow of `xs` is carried over.
    unsafe { std::slice::from_raw_parts(xs.as_ptr().cast::<u8>(), std::mem::size_of_val(xs)) }
}

fn u32_bytes_mut(xs: &mut [u32]) -> &mut [u8] {
    // SAFETY: as for `f32_bytes_mut`: every byte pattern is a valid u32 (the sampler writes i32
    // ids in 0..vocab, whose bits are the same as the u32's).
    unsafe { std::slice::from_raw_parts_mut(xs.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(xs)) }
}
