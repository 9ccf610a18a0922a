//! GGUF to Hugging Face layout: config.json, HF-named tensors with HF layouts, tokenizer.json
//! (from the GGUF's BPE vocabulary and merges) and tokenizer_config.json with the chat template,
//! on disk or in memory. Tensors are either dequantized to one float dtype (a safetensors
//! checkpoint, `convert-gguf`) or kept as stored ([`Tensors::Keep`], for the CPU kernels).
//!
//! Layout notes: GGUF lists dimensions innermost first (`[in, out]` for a weight), so the HF
//! shape is the reverse. llama.cpp's converter permutes the rows of Llama q/k projections from
//! HF's rotate-half order into interleaved pairs; importing undoes that permutation (on whole
//! rows, which are whole blocks in every type).

use std::path::Path;

use djinn_backend::quant::dequantize_row;
use djinn_backend::{DType, QuantType};
use serde_json::{json, Value};

use super::bpe::bpe_tokenizer;
use super::reader::{GgmlType, GgufFile, GgufValue};
use crate::checkpoint::{convert_floats, OwnedTensor};
use crate::error::{ModelError, Result};

/// A converted model, ready to write out or to load directly.
pub struct Converted {
    pub config: Value,
    pub generation_config: Value,
    pub tensors: Vec<OwnedTensor>,
    /// tokenizer.json, when the GGUF carries a BPE tokenizer we can express.
    pub tokenizer: Option<Value>,
    pub tokenizer_config: Value,
}

fn hf_name(gguf: &str) -> Option<String> {
    Some(match gguf {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        _ => {
            let rest = gguf.strip_prefix("blk.")?;
            let (l, t) = rest.split_once('.')?;
            let l: usize = l.parse().ok()?;
            let (base, kind) = t.rsplit_once('.')?;
            let hf = match base {
                "attn_norm" => "input_layernorm",
                "ffn_norm" => "post_attention_layernorm",
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                _ => return None,
            };
            format!("model.layers.{l}.{hf}.{kind}")
        }
    })
}

/// Undoes llama.cpp's q/k row permutation on rows of `row_bytes`: GGUF row `2i + p` of a head is
/// HF row `p·hd/2 + i`.
fn unpermute_rows(x: &[u8], rows: usize, row_bytes: usize, heads: usize) -> Vec<u8> {
    let hd = rows / heads;
    let mut out = vec![0u8; x.len()];
    for h in 0..heads {
        for i in 0..hd / 2 {
            for p in 0..2 {
                let src = h * hd + 2 * i + p;
                let dst = h * hd + p * (hd / 2) + i;
                out[dst * row_bytes..(dst + 1) * row_bytes].copy_from_slice(&x[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    out
}

#[cfg(test)]
pub(super) fn unpermute_rows_f32(x: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let b: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    unpermute_rows(&b, rows, cols * 4, heads)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

enum Stored {
    Float(DType),
    Quant(QuantType),
}

/// Dequantizes `bytes` of type `ty` into f32s appended to `out`.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut Vec<f32>) {
    match ty {
        GgmlType::F32 => out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        GgmlType::F16 => out.extend(bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())),
        GgmlType::BF16 => out.extend(bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())),
        GgmlType::Quant(q) => {
            let n0 = out.len();
            out.resize(n0 + bytes.len() / q.block_bytes() * q.block_len(), 0.0);
            dequantize_row(q, bytes, &mut out[n0..]);
        }
    }
}

/// What [`convert`] does with each tensor's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tensors {
    /// Every tensor dequantized (or converted) to this float dtype: a safetensors checkpoint.
    Dequantize(DType),
    /// Quantized tensors kept in their GGML blocks, float tensors in their file dtype: what the
    /// CPU kernels read directly (bytes resident = the file's tensor bytes).
    Keep,
}

/// Converts a parsed GGUF (whose bytes are `buf`) into HF-named tensors, config and tokenizer.
pub fn convert(g: &GgufFile, buf: &[u8], mode: Tensors) -> Result<Converted> {
    if let Tensors::Dequantize(dtype) = mode {
        if !dtype.is_float() {
            return Err(g.err(format!("output dtype {dtype} is not a float type")));
        }
    }
    let dtype = match mode {
        Tensors::Dequantize(d) => d,
        Tensors::Keep => DType::F32,
    };
    let arch =
        g.get("general.architecture").and_then(GgufValue::as_str).ok_or_else(|| g.err("no general.architecture"))?;
    let (hf_arch, model_type, permute_qk) = match arch {
        "llama" => ("LlamaForCausalLM", "llama", true),
        "qwen2" => ("Qwen2ForCausalLM", "qwen2", false),
        other => return Err(g.err(format!("architecture {other:?} unsupported (llama, qwen2)"))),
    };
    let key = |k: &str| format!("{arch}.{k}");
    let num = |k: &str| -> Result<u64> {
        g.get(&key(k)).and_then(GgufValue::as_u64).ok_or_else(|| g.err(format!("missing or invalid {}", key(k))))
    };
    let hidden = num("embedding_length")? as usize;
    let heads = num("attention.head_count")? as usize;
    let kv_heads =
        g.get(&key("attention.head_count_kv")).and_then(GgufValue::as_u64).map(|v| v as usize).unwrap_or(heads);
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(g.err(format!("head counts {heads}/{kv_heads} invalid")));
    }
    let head_dim =
        g.get(&key("attention.key_length")).and_then(GgufValue::as_u64).map(|v| v as usize).unwrap_or(hidden / heads);
    if g.tensors.iter().any(|t| t.name == "rope_freqs.weight") {
        return Err(g.err("per-frequency RoPE factors (rope_freqs.weight) are not supported"));
    }
    let tokens = g.get("tokenizer.ggml.tokens").and_then(GgufValue::as_array);
    let embd = g.tensors.iter().find(|t| t.name == "token_embd.weight").ok_or_else(|| g.err("no token_embd.weight"))?;
    let vocab = embd.dims.get(1).copied().unwrap_or(0);
    let tied = !g.tensors.iter().any(|t| t.name == "output.weight");
    let bos = g.get("tokenizer.ggml.bos_token_id").and_then(GgufValue::as_u64);
    let eos = g.get("tokenizer.ggml.eos_token_id").and_then(GgufValue::as_u64);
    let mut config = json!({
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": num("feed_forward_length")?,
        "num_hidden_layers": num("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": num("context_length")?,
        "rms_norm_eps": g.get(&key("attention.layer_norm_rms_epsilon")).and_then(GgufValue::as_f64).unwrap_or(1e-6),
        "rope_theta": g.get(&key("rope.freq_base")).and_then(GgufValue::as_f64).unwrap_or(10000.0),
        "tie_word_embeddings": tied,
        "vocab_size": vocab,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": match dtype { DType::F16 => "float16", DType::BF16 => "bfloat16", _ => "float32" },
    });
    if g.get(&key("rope.scaling.type")).and_then(GgufValue::as_str) == Some("linear") {
        let f = g.get(&key("rope.scaling.factor")).and_then(GgufValue::as_f64).unwrap_or(1.0);
        config["rope_scaling"] = json!({"rope_type": "linear", "factor": f});
    }

    let mut out = Vec::with_capacity(g.tensors.len());
    for t in &g.tensors {
        let name =
            hf_name(&t.name).ok_or_else(|| g.err(format!("tensor {} has no Hugging Face counterpart", t.name)))?;
        if tied && name == "lm_head.weight" {
            continue;
        }
        let shape: Vec<usize> = t.dims.iter().rev().copied().collect();
        let bytes = &buf[t.start..t.end];
        let (ty, mut data) = match (mode, t.ty) {
            (Tensors::Keep, GgmlType::Quant(q)) => (Stored::Quant(q), bytes.to_vec()),
            (Tensors::Keep, GgmlType::F32) => (Stored::Float(DType::F32), bytes.to_vec()),
            (Tensors::Keep, GgmlType::F16) => (Stored::Float(DType::F16), bytes.to_vec()),
            (Tensors::Keep, GgmlType::BF16) => (Stored::Float(DType::BF16), bytes.to_vec()),
            (Tensors::Dequantize(d), ty) => {
                let mut f = Vec::new();
                dequantize(ty, bytes, &mut f);
                let src: Vec<u8> = f.iter().flat_map(|x| x.to_le_bytes()).collect();
                let mut data = vec![0u8; f.len() * d.size_bytes()];
                convert_floats(&src, DType::F32, &mut data, d);
                (Stored::Float(d), data)
            }
        };
        if permute_qk && (name.ends_with("q_proj.weight") || name.ends_with("k_proj.weight")) && shape.len() == 2 {
            let h = if name.ends_with("q_proj.weight") { heads } else { kv_heads };
            if !shape[0].is_multiple_of(2 * h) {
                return Err(g.err(format!("tensor {}: {} rows do not split into {h} heads", t.name, shape[0])));
            }
            // Rows are whole blocks in every type: the permutation moves row bytes.
            data = unpermute_rows(&data, shape[0], data.len() / shape[0], h);
        }
        out.push(match ty {
            Stored::Float(dtype) => OwnedTensor { name, dtype, quant: None, shape, data },
            Stored::Quant(q) => OwnedTensor { name, dtype: DType::U8, quant: Some(q), shape, data },
        });
    }

    let tokenizer = match (g.get("tokenizer.ggml.model").and_then(GgufValue::as_str), tokens) {
        (Some("gpt2"), Some(toks)) => Some(bpe_tokenizer(g, toks)?),
        (Some(other), _) => {
            tracing::warn!(tokenizer = other, "GGUF tokenizer type not converted; the model serves token ids only");
            None
        }
        _ => None,
    };
    let tok_str = |id: Option<u64>| -> Value {
        id.and_then(|i| tokens.and_then(|t| t.get(i as usize)).and_then(GgufValue::as_str))
            .map(|s| Value::String(s.into()))
            .unwrap_or(Value::Null)
    };
    let mut tokenizer_config = json!({
        "bos_token": tok_str(bos),
        "eos_token": tok_str(eos),
        "add_bos_token": g.get("tokenizer.ggml.add_bos_token").and_then(GgufValue::as_bool).unwrap_or(false),
    });
    if let Some(t) = g.get("tokenizer.chat_template").and_then(GgufValue::as_str) {
        tokenizer_config["chat_template"] = Value::String(t.into());
    }
    let generation_config = json!({"bos_token_id": bos, "eos_token_id": eos});
    Ok(Converted { config, generation_config, tensors: out, tokenizer, tokenizer_config })
}

/// Reads and converts `path`.
pub fn convert_file(path: &Path, mode: Tensors) -> Result<Converted> {
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    // SAFETY: read-only private mapping; every range read from it is bounds-checked in `parse`.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
    let g = GgufFile::parse(path, &map)?;
    convert(&g, &map, mode)
}

impl Converted {
    /// Writes a Hugging Face layout directory.
    pub fn write_dir(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let write_json = |name: &str, v: &Value| -> Result<()> {
            let p = dir.join(name);
            let s =
                serde_json::to_vec_pretty(v).map_err(|e| ModelError::Json { path: p.clone(), msg: e.to_string() })?;
            std::fs::write(&p, s).map_err(|e| ModelError::io(&p, e))
        };
        write_json("config.json", &self.config)?;
        write_json("generation_config.json", &self.generation_config)?;
        write_json("tokenizer_config.json", &self.tokenizer_config)?;
        if let Some(t) = &self.tokenizer {
            write_json("tokenizer.json", t)?;
        }
        let path = dir.join("model.safetensors");
        let st = |d: DType| match d {
            DType::F16 => safetensors::Dtype::F16,
            DType::BF16 => safetensors::Dtype::BF16,
            _ => safetensors::Dtype::F32,
        };
        let views = self
            .tensors
            .iter()
            .map(|t| {
                safetensors::tensor::TensorView::new(st(t.dtype), t.shape.clone(), &t.data)
                    .map(|v| (t.name.clone(), v))
                    .map_err(|e| ModelError::tensor(&path, &t.name, e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        safetensors::serialize_to_file(views, None, &path).map_err(|e| ModelError::tensor(&path, "*", e.to_string()))
    }
}
