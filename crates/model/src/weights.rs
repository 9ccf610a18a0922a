//! Where each weight lives in the weights region, and the one-time upload that puts it there.
//!
//! Layout choices (all offsets are relative to the model's lease):
//! - q, k and v projections are stored back to back as one `[q_dim + 2·kv_dim, hidden]` matrix,
//!   and gate/up as one `[2·intermediate, hidden]` matrix, when the parts share a storage type.
//!   A single-row decode step then runs one GEMV per fused matrix (one pass over the weights, one
//!   parallel dispatch); a multi-row step addresses the row blocks separately, because each is
//!   still a contiguous `[out, in]` matrix. Parts of different types (a llama.cpp Q4_K_M mix)
//!   are separate matrices, each 256-byte aligned.
//! - Float tensors have the model's single float dtype (the checkpoint's, or `--dtype`): the CPU
//!   backend widens f16/bf16 inside its GEMV, so no f32 copies of low-precision weights exist.
//! - Quantized matrices (a GGUF's Q4_0 … Q6_K tensors) stay in their GGML blocks on backends
//!   with quantized kernels ([`Backend::quantized_weights`]): resident bytes are the file's
//!   tensor bytes. Elsewhere they are dequantized to the float dtype here, at load.
//! - The RoPE inverse-frequency table (f32) is stored with the weights: it is per model, not per step.

use djinn_backend::quant::dequantize_row;
use djinn_backend::{Backend, DType, QuantType};

use crate::checkpoint::{convert_floats, Checkpoint};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

pub const WEIGHT_ALIGN_BYTES: usize = 256;

/// One weight matrix `[n, k]`: its byte offset (relative to the lease base) and its storage,
/// GGML blocks of `quant` or (`None`) the layout's float dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mat {
    pub offset: usize,
    pub quant: Option<QuantType>,
}

impl Mat {
    /// Bytes of `n` rows of `k` elements in this storage (`dtype` for float matrices).
    pub fn bytes(&self, dtype: DType, n: usize, k: usize) -> usize {
        match self.quant {
            Some(q) => n * q.row_bytes(k).unwrap_or(0),
            None => n * k * dtype.size_bytes(),
        }
    }
}

/// Byte offsets (relative to the lease base) of one layer's tensors.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub ln_in: usize,
    /// The q, k and v row blocks (one fused matrix when they share a storage type).
    pub qkv: [Mat; 3],
    pub qkv_bias: Option<usize>,
    pub o: Mat,
    pub o_bias: Option<usize>,
    pub ln_post: usize,
    /// The gate and up row blocks (one fused matrix when they share a storage type).
    pub gate_up: [Mat; 2],
    pub gate_up_bias: Option<usize>,
    pub down: Mat,
    pub down_bias: Option<usize>,
}

#[derive(Clone, Debug)]
pub struct WeightLayout {
    /// The float dtype of every tensor that is not stored quantized.
    pub dtype: DType,
    pub embed: Mat,
    pub norm: usize,
    /// Equal to `embed` when the embeddings are tied.
    pub lm_head: Mat,
    pub inv_freq: usize,
    pub layers: Vec<LayerWeights>,
    pub total_bytes: usize,
    /// Bytes of the tensors the layout holds, as the checkpoint stores them (for a GGUF: the
    /// file's tensor bytes); `total_bytes` is within alignment padding of it when nothing is
    /// converted.
    pub source_bytes: usize,
}

/// One checkpoint tensor's place: name, shape, byte offset (relative to the lease) and storage.
struct Source {
    name: String,
    shape: Vec<usize>,
    offset: usize,
    quant: Option<QuantType>,
}

fn name(l: usize, rest: &str) -> String {
    format!("model.layers.{l}.{rest}")
}

impl WeightLayout {
    /// Offsets for `cfg` with float tensors as `dtype` and quantized checkpoint tensors kept in
    /// their blocks when `keep_quant`, plus the list of what goes where.
    fn plan(ck: &Checkpoint, cfg: &ModelConfig, dtype: DType, keep_quant: bool) -> (WeightLayout, Vec<Source>) {
        let es = dtype.size_bytes();
        let (h, qd, kvd, inter, v) =
            (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size, cfg.vocab_size);
        let mut cursor = 0usize;
        let mut sources: Vec<Source> = Vec::new();
        let mut source_bytes = 0usize;
        // Places tensors back to back while they share a storage type (one fused matrix), each
        // new run 256-byte aligned; returns each tensor's `Mat`.
        let mut put = |parts: Vec<(String, Vec<usize>)>| -> Vec<Mat> {
            let mut prev: Option<Option<QuantType>> = None;
            let mut mats = Vec::with_capacity(parts.len());
            for (name, shape) in parts {
                let e = ck.get(&name);
                source_bytes += e.map_or(0, |e| ck.data(e).1.len());
                let quant = if keep_quant { e.and_then(|e| e.quant) } else { None };
                if prev.is_some_and(|p| p != quant) {
                    cursor = cursor.next_multiple_of(WEIGHT_ALIGN_BYTES);
                }
                prev = Some(quant);
                let (rows, cols) = match shape[..] {
                    [r, c] => (r, c),
                    _ => (1, shape.iter().product()),
                };
                let m = Mat { offset: cursor, quant };
                cursor += match quant {
                    Some(q) => rows * q.row_bytes(cols).unwrap_or(0),
                    None => rows * cols * es,
                };
                sources.push(Source { name, shape, offset: m.offset, quant });
                mats.push(m);
            }
            cursor = cursor.next_multiple_of(WEIGHT_ALIGN_BYTES);
            mats
        };
        let one = |n: String, shape: Vec<usize>| vec![(n, shape)];
        let embed = put(one("model.embed_tokens.weight".into(), vec![v, h]))[0];
        let mut layers = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let ln_in = put(one(name(l, "input_layernorm.weight"), vec![h]))[0].offset;
            let qkv = put(vec![
                (name(l, "self_attn.q_proj.weight"), vec![qd, h]),
                (name(l, "self_attn.k_proj.weight"), vec![kvd, h]),
                (name(l, "self_attn.v_proj.weight"), vec![kvd, h]),
            ]);
            let qkv_bias = cfg.qkv_bias.then(|| {
                put(vec![
                    (name(l, "self_attn.q_proj.bias"), vec![qd]),
                    (name(l, "self_attn.k_proj.bias"), vec![kvd]),
                    (name(l, "self_attn.v_proj.bias"), vec![kvd]),
                ])[0]
                    .offset
            });
            let o = put(one(name(l, "self_attn.o_proj.weight"), vec![h, qd]))[0];
            let o_bias = cfg.o_bias.then(|| put(one(name(l, "self_attn.o_proj.bias"), vec![h]))[0].offset);
            let ln_post = put(one(name(l, "post_attention_layernorm.weight"), vec![h]))[0].offset;
            let gate_up = put(vec![
                (name(l, "mlp.gate_proj.weight"), vec![inter, h]),
                (name(l, "mlp.up_proj.weight"), vec![inter, h]),
            ]);
            let gate_up_bias = cfg.mlp_bias.then(|| {
                put(vec![(name(l, "mlp.gate_proj.bias"), vec![inter]), (name(l, "mlp.up_proj.bias"), vec![inter])])[0]
                    .offset
            });
            let down = put(one(name(l, "mlp.down_proj.weight"), vec![h, inter]))[0];
            let down_bias = cfg.mlp_bias.then(|| put(one(name(l, "mlp.down_proj.bias"), vec![h]))[0].offset);
            layers.push(LayerWeights {
                ln_in,
                qkv: [qkv[0], qkv[1], qkv[2]],
                qkv_bias,
                o,
                o_bias,
                ln_post,
                gate_up: [gate_up[0], gate_up[1]],
                gate_up_bias,
                down,
                down_bias,
            });
        }
        let norm = put(one("model.norm.weight".into(), vec![h]))[0].offset;
        let lm_head = if cfg.tie_word_embeddings { embed } else { put(one("lm_head.weight".into(), vec![v, h]))[0] };
        // The f32 inv_freq table is not a checkpoint tensor: reserve it by hand.
        let inv_freq = cursor;
        cursor = (cursor + cfg.head_dim / 2 * 4).next_multiple_of(WEIGHT_ALIGN_BYTES);
        (WeightLayout { dtype, embed, norm, lm_head, inv_freq, layers, total_bytes: cursor, source_bytes }, sources)
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
        // A quantized table (a GGUF): its float tensors are norms, kept in f32.
        Ok(if e.quant.is_some() { DType::F32 } else { e.dtype })
    }

    /// Checks that every tensor `cfg` needs exists with the right shape, and returns the layout
    /// with quantized tensors kept quantized. Runs before any device memory is touched.
    pub fn validate(ck: &Checkpoint, cfg: &ModelConfig, dtype: DType) -> Result<WeightLayout> {
        Self::validate_for(ck, cfg, dtype, true)
    }

    /// As [`WeightLayout::validate`]; quantized tensors are dequantized to `dtype` unless
    /// `keep_quant` (pass [`Backend::quantized_weights`]).
    pub fn validate_for(ck: &Checkpoint, cfg: &ModelConfig, dtype: DType, keep_quant: bool) -> Result<WeightLayout> {
        let (layout, sources) = Self::plan(ck, cfg, dtype, keep_quant);
        for s in &sources {
            let e = ck.expect(&s.name, &s.shape)?;
            if let Some(q) = e.quant {
                if s.shape.len() != 2 {
                    return Err(ModelError::tensor(
                        ck.dir(),
                        &s.name,
                        format!("is {q}-quantized but is not a matrix; requantize keeping it in F32 or load the safetensors directory"),
                    ));
                }
            }
        }
        Ok(layout)
    }

    /// Bytes the weights need in the weights region.
    pub fn bytes_needed(ck: &Checkpoint, cfg: &ModelConfig, dtype: DType) -> Result<usize> {
        Ok(Self::validate(ck, cfg, dtype)?.total_bytes)
    }

    /// Uploads every tensor to `region[base..base + total_bytes]`: quantized tensors as they are
    /// where `backend` has quantized kernels (else dequantized), float tensors converted to the
    /// layout's dtype. Shows progress on stderr when the model is large (> 256 MiB).
    pub fn upload<B: Backend>(
        ck: &Checkpoint,
        cfg: &ModelConfig,
        dtype: DType,
        backend: &B,
        region: &B::Region,
        base: usize,
    ) -> Result<WeightLayout> {
        let (layout, sources) = Self::plan(ck, cfg, dtype, backend.quantized_weights());
        let mut progress = Progress::new(layout.total_bytes as u64);
        let mut done_bytes = 0usize;
        // Conversion staging, reused: 8 MiB of output per write keeps peak host memory flat.
        const CHUNK_ELEMS: usize = 4 << 20;
        let mut staging: Vec<u8> = Vec::new();
        let mut floats: Vec<f32> = Vec::new();
        for s in &sources {
            let e = ck.expect(&s.name, &s.shape)?;
            let (_, src) = ck.data(e);
            let mut off = base + s.offset;
            match (e.quant, s.quant) {
                (Some(_), Some(_)) => {
                    backend.write(region, off, src)?;
                    done_bytes += src.len();
                }
                (Some(q), None) => {
                    // Dequantized here (a backend without quantized kernels): whole rows per chunk.
                    let cols = s.shape[s.shape.len() - 1];
                    let rb = q.row_bytes(cols).unwrap_or(1);
                    let rows_per = (CHUNK_ELEMS / cols.max(1)).max(1);
                    for chunk in src.chunks(rows_per * rb) {
                        floats.resize(chunk.len() / rb * cols, 0.0);
                        dequantize_row(q, chunk, &mut floats);
                        let bytes: &[u8] = f32_bytes(&floats);
                        staging.resize(floats.len() * dtype.size_bytes(), 0);
                        convert_floats(bytes, DType::F32, &mut staging, dtype);
                        backend.write(region, off, &staging)?;
                        off += staging.len();
                        done_bytes += staging.len();
                    }
                }
                (None, _) if e.dtype == dtype => {
                    backend.write(region, off, src)?;
                    done_bytes += src.len();
                }
                (None, _) => {
                    let (fs, ts) = (e.dtype.size_bytes(), dtype.size_bytes());
                    for chunk in src.chunks(CHUNK_ELEMS * fs) {
                        let n_el = chunk.len() / fs;
                        staging.resize(n_el * ts, 0);
                        convert_floats(chunk, e.dtype, &mut staging, dtype);
                        backend.write(region, off, &staging)?;
                        off += staging.len();
                    }
                    done_bytes += src.len() / fs * ts;
                }
            }
            progress.set(done_bytes as u64);
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

fn f32_bytes(xs: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte view of it is valid; same memory and lifetime.
    unsafe { std::slice::from_raw_parts(xs.as_ptr().cast::<u8>(), std::mem::size_of_val(xs)) }
}
