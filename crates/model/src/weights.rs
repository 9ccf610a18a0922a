//! Where each weight lives in the weights region, and the one-time upload that puts it there.
//!
//! Layout choices (all offsets are relative to the model's lease and 256-byte aligned):
//! - q, k and v projections are stored back to back as one `[q_dim + 2·kv_dim, hidden]` matrix,
//!   and gate/up as one `[2·intermediate, hidden]` matrix. A single-row decode step then runs one
//!   GEMV per fused matrix (one pass over the weights, one parallel dispatch); a multi-row step
//!   addresses the row blocks separately, because each is still a contiguous `[out, in]` matrix.
//! - Every tensor has the model's single storage dtype (the checkpoint's, or `--dtype`): the CPU
//!   backend widens f16/bf16 inside its GEMV, so no f32 copies of low-precision weights exist.
//! - The RoPE inverse-frequency table (f32) is stored with the weights: it is per model, not per step.

use djinn_backend::{Backend, DType};

use crate::checkpoint::{convert_floats, Checkpoint};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

pub const WEIGHT_ALIGN_BYTES: usize = 256;

/// Byte offsets (relative to the lease base) of one layer's tensors.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub ln_in: usize,
    pub qkv: usize,
    pub qkv_bias: Option<usize>,
    pub o: usize,
    pub o_bias: Option<usize>,
    pub ln_post: usize,
    pub gate_up: usize,
    pub gate_up_bias: Option<usize>,
    pub down: usize,
    pub down_bias: Option<usize>,
}

#[derive(Clone, Debug)]
pub struct WeightLayout {
    pub dtype: DType,
    pub embed: usize,
    pub norm: usize,
    /// Equal to `embed` when the embeddings are tied.
    pub lm_head: usize,
    pub inv_freq: usize,
    pub layers: Vec<LayerWeights>,
    pub total_bytes: usize,
}

/// One destination tensor: the checkpoint tensors concatenated (row blocks) into it.
struct Part {
    offset: usize,
    sources: Vec<(String, Vec<usize>)>,
}

fn name(l: usize, rest: &str) -> String {
    format!("model.layers.{l}.{rest}")
}

impl WeightLayout {
    /// Offsets for `cfg` stored as `dtype`, plus the list of what goes where.
    fn plan(cfg: &ModelConfig, dtype: DType) -> (WeightLayout, Vec<Part>) {
        let es = dtype.size_bytes();
        let (h, qd, kvd, inter, v) =
            (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size, cfg.vocab_size);
        let mut cursor = 0usize;
        let mut parts = Vec::new();
        let mut put = |sources: Vec<(String, Vec<usize>)>, elems: usize| -> usize {
            let off = cursor;
            cursor = (cursor + elems * es).next_multiple_of(WEIGHT_ALIGN_BYTES);
            parts.push(Part { offset: off, sources });
            off
        };
        let embed = put(vec![("model.embed_tokens.weight".into(), vec![v, h])], v * h);
        let mut layers = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let ln_in = put(vec![(name(l, "input_layernorm.weight"), vec![h])], h);
            let qkv = put(
                vec![
                    (name(l, "self_attn.q_proj.weight"), vec![qd, h]),
                    (name(l, "self_attn.k_proj.weight"), vec![kvd, h]),
                    (name(l, "self_attn.v_proj.weight"), vec![kvd, h]),
                ],
                (qd + 2 * kvd) * h,
            );
            let qkv_bias = cfg.qkv_bias.then(|| {
                put(
                    vec![
                        (name(l, "self_attn.q_proj.bias"), vec![qd]),
                        (name(l, "self_attn.k_proj.bias"), vec![kvd]),
                        (name(l, "self_attn.v_proj.bias"), vec![kvd]),
                    ],
                    qd + 2 * kvd,
                )
            });
            let o = put(vec![(name(l, "self_attn.o_proj.weight"), vec![h, qd])], h * qd);
            let o_bias = cfg.o_bias.then(|| put(vec![(name(l, "self_attn.o_proj.bias"), vec![h])], h));
            let ln_post = put(vec![(name(l, "post_attention_layernorm.weight"), vec![h])], h);
            let gate_up = put(
                vec![
                    (name(l, "mlp.gate_proj.weight"), vec![inter, h]),
                    (name(l, "mlp.up_proj.weight"), vec![inter, h]),
                ],
                2 * inter * h,
            );
            let gate_up_bias = cfg.mlp_bias.then(|| {
                put(
                    vec![(name(l, "mlp.gate_proj.bias"), vec![inter]), (name(l, "mlp.up_proj.bias"), vec![inter])],
                    2 * inter,
                )
            });
            let down = put(vec![(name(l, "mlp.down_proj.weight"), vec![h, inter])], h * inter);
            let down_bias = cfg.mlp_bias.then(|| put(vec![(name(l, "mlp.down_proj.bias"), vec![h])], h));
            layers.push(LayerWeights {
                ln_in,
                qkv,
                qkv_bias,
                o,
                o_bias,
                ln_post,
                gate_up,
                gate_up_bias,
                down,
                down_bias,
            });
        }
        let norm = put(vec![("model.norm.weight".into(), vec![h])], h);
        let lm_head =
            if cfg.tie_word_embeddings { embed } else { put(vec![("lm_head.weight".into(), vec![v, h])], v * h) };
        // The f32 inv_freq table is not a checkpoint tensor: reserve it by hand.
        let inv_freq = cursor;
        cursor = (cursor + cfg.head_dim / 2 * 4).next_multiple_of(WEIGHT_ALIGN_BYTES);
        (WeightLayout { dtype, embed, norm, lm_head, inv_freq, layers, total_bytes: cursor }, parts)
    }

    /// The storage dtype: `want`, else the embedding table's dtype.
    pub fn choose_dtype(ck: &Checkpoint, want: Option<DType>) -> Result<DType> {
        if let Some(d) = want {
            if !d.is_float() {
                return Err(ModelError::Memory(format!("--dtype {d} is not a float type")));
            }
            return Ok(d);
        }
        let e = ck.get("model.embed_tokens.weight").ok_or_else(|| ModelError::MissingTensor {
            dir: ck.dir().into(),
            tensor: "model.embed_tokens.weight".into(),
        })?;
        Ok(e.dtype)
    }

    /// Checks that every tensor `cfg` needs exists with the right shape, and returns the layout.
    /// Runs before any device memory is touched.
    pub fn validate(ck: &Checkpoint, cfg: &ModelConfig, dtype: DType) -> Result<WeightLayout> {
        let (layout, parts) = Self::plan(cfg, dtype);
        for p in &parts {
            for (n, shape) in &p.sources {
                ck.expect(n, shape)?;
            }
        }
        Ok(layout)
    }

    /// Bytes the weights need in the weights region.
    pub fn bytes_needed(ck: &Checkpoint, cfg: &ModelConfig, dtype: DType) -> Result<usize> {
        Ok(Self::validate(ck, cfg, dtype)?.total_bytes)
    }

    /// Uploads every tensor to `region[base..base + total_bytes]`, converting to the layout's
    /// dtype on the way. Shows progress on stderr when the model is large (> 256 MiB).
    pub fn upload<B: Backend>(
        ck: &Checkpoint,
        cfg: &ModelConfig,
        dtype: DType,
        backend: &B,
        region: &B::Region,
        base: usize,
    ) -> Result<WeightLayout> {
        let (layout, parts) = Self::plan(cfg, dtype);
        let mut progress = Progress::new(layout.total_bytes as u64);
        let mut done_bytes = 0usize;
        // Conversion staging, reused: 8 MiB of output per write keeps peak host memory flat.
        const CHUNK_ELEMS: usize = 4 << 20;
        let mut staging: Vec<u8> = Vec::new();
        for p in &parts {
            let mut off = base + p.offset;
            for (n, shape) in &p.sources {
                let e = ck.expect(n, shape)?;
                let (_, src) = ck.data(e);
                if e.dtype == dtype {
                    backend.write(region, off, src)?;
                    off += src.len();
                } else {
                    let (fs, ts) = (e.dtype.size_bytes(), dtype.size_bytes());
                    for chunk in src.chunks(CHUNK_ELEMS * fs) {
                        let n_el = chunk.len() / fs;
                        staging.resize(n_el * ts, 0);
                        convert_floats(chunk, e.dtype, &mut staging, dtype);
                        backend.write(region, off, &staging)?;
                        off += staging.len();
                    }
                }
                done_bytes += src.len() / e.dtype.size_bytes() * dtype.size_bytes();
                progress.set(done_bytes as u64);
            }
        }
        let inv: Vec<u8> = cfg.inv_freq().iter().flat_map(|f| f.to_le_bytes()).collect();
        backend.write(region, base + layout.inv_freq, &inv)?;
        progress.finish();
        Ok(layout)
    }
}

/// Weight-loading progress for loads over 256 MiB: a progress bar when stderr is a terminal
/// (indicatif draws nothing otherwise), else a log line at each quarter, so files get no `\r`.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    logged_quarter: u64,
}

impl Progress {
    fn new(total: u64) -> Progress {
        let big = total > (256 << 20);
        let bar = (big && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
            let bar = indicatif::ProgressBar::new(total);
            let style =
                indicatif::ProgressStyle::with_template("loading weights {bar:30} {binary_bytes}/{binary_total_bytes}");
            bar.set_style(style.unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
            bar
        });
        // Small loads log nothing (quarter 4 = done).
        Progress { bar, total, logged_quarter: if big { 0 } else { 4 } }
    }

    fn set(&mut self, done: u64) {
        match &self.bar {
            Some(bar) => bar.set_position(done),
            None => {
                let quarter = done * 4 / self.total.max(1);
                if quarter > self.logged_quarter && quarter < 4 {
                    self.logged_quarter = quarter;
                    tracing::info!(
                        mib = done >> 20,
                        total_mib = self.total >> 20,
                        "loading weights: {}%",
                        quarter * 25
                    );
                }
            }
        }
    }

    fn finish(self) {
        match self.bar {
            Some(bar) => bar.finish_and_clear(),
            None if self.logged_quarter < 4 => tracing::info!(mib = self.total >> 20, "weights loaded"),
            None => {}
        }
    }
}
