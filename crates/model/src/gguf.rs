//! GGUF import: parse a GGUF file (v2/v3), dequantize its tensors (F32, F16, BF16, Q8_0, Q4_0,
//! Q4_1, Q5_0, Q5_1) and turn it into a Hugging Face layout — config.json, safetensors tensors
//! with HF names and layouts, tokenizer.json built from the GGUF's BPE vocabulary and merges,
//! tokenizer_config.json with the chat template — on disk or in memory.
//!
//! Every length, count and offset read from the file is checked against the file before use;
//! a malformed file is a [`ModelError::Gguf`] naming what is wrong, never a panic.
//!
//! Layout notes: GGUF lists dimensions innermost first (`[in, out]` for a weight), so the HF
//! shape is the reverse. llama.cpp's converter permutes the rows of Llama q/k projections from
//! HF's rotate-half order into interleaved pairs; importing undoes that permutation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use djinn_backend::DType;
use half::f16;
use serde_json::{json, Value};

use crate::checkpoint::{convert_floats, OwnedTensor};
use crate::error::{ModelError, Result};

#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    Uint(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::Uint(v) => Some(v),
            GgufValue::Int(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::Float(v) => Some(v),
            GgufValue::Uint(v) => Some(v as f64),
            GgufValue::Int(v) => Some(v as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// GGML tensor types this importer knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    BF16,
}

impl GgmlType {
    fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }
    /// (elements per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
        }
    }
}

#[derive(Clone, Debug)]
pub struct GgufTensor {
    pub name: String,
    /// GGUF order: innermost first.
    pub dims: Vec<usize>,
    pub ty: GgmlType,
    /// Absolute byte range in the file.
    pub start: usize,
    pub end: usize,
}

#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub meta: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensor>,
}

struct Reader<'a> {
    path: &'a Path,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn err(&self, why: impl Into<String>) -> ModelError {
        ModelError::Gguf { path: self.path.to_path_buf(), why: format!("{} (at byte {})", why.into(), self.pos) }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| self.err("truncated file"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| self.err("short read"))?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| self.err("short read"))?))
    }
    /// A count that must fit in what is left of the file at `min_bytes` bytes per item.
    fn count(&mut self, min_bytes: usize, what: &str) -> Result<usize> {
        let n = self.u64()?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_bytes.max(1) as u64) > left {
            return Err(self.err(format!("{what} count {n} exceeds the file")));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String> {
        let n = self.count(1, "string length")?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("string is not UTF-8"))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::Uint(self.take(1)?[0] as u64),
            1 => GgufValue::Int(self.take(1)?[0] as i8 as i64),
            2 => GgufValue::Uint(u16::from_le_bytes([self.take(1)?[0], self.take(1)?[0]]) as u64),
            3 => GgufValue::Int(i16::from_le_bytes([self.take(1)?[0], self.take(1)?[0]]) as i64),
            4 => GgufValue::Uint(self.u32()? as u64),
            5 => GgufValue::Int(self.u32()? as i32 as i64),
            6 => GgufValue::Float(f32::from_bits(self.u32()?) as f64),
            7 => GgufValue::Bool(self.take(1)?[0] != 0),
            8 => GgufValue::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(self.err("arrays nested too deeply"));
                }
                let ety = self.u32()?;
                let n = self.count(1, "array")?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(ety, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::Uint(self.u64()?),
            11 => GgufValue::Int(self.u64()? as i64),
            12 => GgufValue::Float(f64::from_bits(self.u64()?)),
            t => return Err(self.err(format!("unknown metadata value type {t}"))),
        })
    }
}

impl GgufFile {
    /// Parses the header, metadata and tensor table of `buf` (the whole file).
    pub fn parse(path: &Path, buf: &[u8]) -> Result<GgufFile> {
        let mut r = Reader { path, buf, pos: 0 };
        if r.take(4)? != b"GGUF" {
            return Err(r.err("not a GGUF file (bad magic)"));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(r.err(format!("unsupported GGUF version {version}")));
        }
        let n_tensors = r.count(24, "tensor")?;
        let n_kv = r.count(12, "metadata")?;
        let mut meta = BTreeMap::new();
        for _ in 0..n_kv {
            let k = r.string()?;
            let ty = r.u32()?;
            let v = r.value(ty, 0)?;
            meta.insert(k, v);
        }
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let nd = r.u32()? as usize;
            if nd == 0 || nd > 4 {
                return Err(r.err(format!("tensor {name}: {nd} dimensions")));
            }
            let mut dims = Vec::with_capacity(nd);
            for _ in 0..nd {
                let d = r.u64()?;
                if d == 0 || d > (1 << 40) {
                    return Err(r.err(format!("tensor {name}: dimension {d}")));
                }
                dims.push(d as usize);
            }
            let tid = r.u32()?;
            let ty =
                GgmlType::from_id(tid).ok_or_else(|| r.err(format!("tensor {name}: unsupported type id {tid}")))?;
            let off = r.u64()? as usize;
            infos.push((name, dims, ty, off));
        }
        let align = match meta.get("general.alignment") {
            Some(v) => {
                v.as_u64().filter(|a| a.is_power_of_two() && *a <= 1 << 16).ok_or_else(|| r.err("bad alignment"))?
                    as usize
            }
            None => 32,
        };
        let data0 = r.pos.next_multiple_of(align);
        let mut tensors = Vec::with_capacity(infos.len());
        for (name, dims, ty, off) in infos {
            let numel = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let (be, bb) = ty.block();
            let bytes = numel.filter(|n| n % be == 0 && dims[0] % be == 0).map(|n| n / be * bb).ok_or_else(|| {
                ModelError::Gguf { path: path.into(), why: format!("tensor {name}: bad shape {dims:?}") }
            })?;
            let start = data0.checked_add(off);
            let end = start.and_then(|s| s.checked_add(bytes)).filter(|&e| e <= buf.len());
            let (Some(start), Some(end)) = (start, end) else {
                return Err(ModelError::Gguf {
                    path: path.into(),
                    why: format!("tensor {name}: data [{off}, +{bytes}) lies outside the file"),
                });
            };
            tensors.push(GgufTensor { name, dims, ty, start, end });
        }
        Ok(GgufFile { path: path.to_path_buf(), version, meta, tensors })
    }

    fn err(&self, why: impl Into<String>) -> ModelError {
        ModelError::Gguf { path: self.path.clone(), why: why.into() }
    }

    fn get(&self, k: &str) -> Option<&GgufValue> {
        self.meta.get(k)
    }
}

/// Dequantizes `bytes` of type `ty` into f32s appended to `out`.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut Vec<f32>) {
    let h = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    let (_, bb) = ty.block();
    match ty {
        GgmlType::F32 => out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        GgmlType::F16 => out.extend(bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())),
        GgmlType::BF16 => out.extend(bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())),
        GgmlType::Q8_0 => {
            for b in bytes.chunks_exact(bb) {
                let d = h(b, 0);
                out.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            for b in bytes.chunks_exact(bb) {
                let d = h(b, 0);
                let (m, qs) = if ty == GgmlType::Q4_1 { (h(b, 2), &b[4..20]) } else { (-8.0 * d, &b[2..18]) };
                // Low nibbles are elements 0..16, high nibbles 16..32.
                out.extend(qs.iter().map(|&q| (q & 0x0f) as f32 * d + m));
                out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            for b in bytes.chunks_exact(bb) {
                let d = h(b, 0);
                let (m, rest) = if ty == GgmlType::Q5_1 { (h(b, 2), &b[4..]) } else { (-16.0 * d, &b[2..]) };
                let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let qs = &rest[4..20];
                for (j, &q) in qs.iter().enumerate() {
                    let hi = (((qh >> j) & 1) << 4) as u8;
                    out.push(((q & 0x0f) | hi) as f32 * d + m);
                }
                for (j, &q) in qs.iter().enumerate() {
                    let hi = (((qh >> (j + 16)) & 1) << 4) as u8;
                    out.push(((q >> 4) | hi) as f32 * d + m);
                }
            }
        }
    }
}

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

/// Undoes llama.cpp's q/k row permutation: GGUF row `2i + p` of a head is HF row `p·hd/2 + i`.
fn unpermute_rows(x: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let hd = rows / heads;
    let mut out = vec![0f32; x.len()];
    for h in 0..heads {
        for i in 0..hd / 2 {
            for p in 0..2 {
                let src = h * hd + 2 * i + p;
                let dst = h * hd + p * (hd / 2) + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&x[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Converts a parsed GGUF (whose bytes are `buf`) into HF tensors of `dtype`, config and tokenizer.
pub fn convert(g: &GgufFile, buf: &[u8], dtype: DType) -> Result<Converted> {
    if !dtype.is_float() {
        return Err(g.err(format!("output dtype {dtype} is not a float type")));
    }
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
    let mut f = Vec::new();
    for t in &g.tensors {
        let name =
            hf_name(&t.name).ok_or_else(|| g.err(format!("tensor {} has no Hugging Face counterpart", t.name)))?;
        if tied && name == "lm_head.weight" {
            continue;
        }
        f.clear();
        dequantize(t.ty, &buf[t.start..t.end], &mut f);
        let shape: Vec<usize> = t.dims.iter().rev().copied().collect();
        if permute_qk && (name.ends_with("q_proj.weight") || name.ends_with("k_proj.weight")) && shape.len() == 2 {
            let h = if name.ends_with("q_proj.weight") { heads } else { kv_heads };
            if !shape[0].is_multiple_of(2 * h) {
                return Err(g.err(format!("tensor {}: {} rows do not split into {h} heads", t.name, shape[0])));
            }
            f = unpermute_rows(&f, shape[0], shape[1], h);
        }
        let src: Vec<u8> = f.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut data = vec![0u8; f.len() * dtype.size_bytes()];
        convert_floats(&src, DType::F32, &mut data, dtype);
        out.push(OwnedTensor { name, dtype, shape, data });
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

/// tokenizer.json for a byte-level BPE vocabulary (the "gpt2" GGUF tokenizer model).
fn bpe_tokenizer(g: &GgufFile, toks: &[GgufValue]) -> Result<Value> {
    let types = g.get("tokenizer.ggml.token_type").and_then(GgufValue::as_array);
    let merges =
        g.get("tokenizer.ggml.merges").and_then(GgufValue::as_array).ok_or_else(|| g.err("BPE without merges"))?;
    let mut vocab = serde_json::Map::with_capacity(toks.len());
    let mut added = Vec::new();
    for (i, t) in toks.iter().enumerate() {
        let s = t.as_str().ok_or_else(|| g.err(format!("token {i} is not a string")))?;
        vocab.insert(s.to_string(), json!(i));
        // Token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
        let ty = types.and_then(|ts| ts.get(i)).and_then(GgufValue::as_u64).unwrap_or(1);
        if ty == 3 || ty == 4 {
            added.push(json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                              "normalized": ty == 4, "special": ty == 3}));
        }
    }
    let merges: Vec<Value> = merges
        .iter()
        .map(|m| m.as_str().map(|s| json!(s)).ok_or_else(|| g.err("merge is not a string")))
        .collect::<Result<_>>()?;
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let pre = g.get("tokenizer.ggml.pre").and_then(GgufValue::as_str).unwrap_or("default");
    let pre_tokenizer = match pre {
        // llama.cpp splits digits one by one for these (then the GPT-2 pattern).
        "smollm" | "starcoder" | "refact" | "codeshell" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" | "llama3" | "qwen2" | "deepseek-llm" => {
            let digits = if pre == "qwen2" { "\\p{N}" } else { "\\p{N}{1,3}" };
            let pattern = format!(
                "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{{L}}\\p{{N}}]?\\p{{L}}+|{digits}| ?[^\\s\\p{{L}}\\p{{N}}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
            );
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
                byte_level(false)]})
        }
        _ => byte_level(true),
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    }))
}

/// Reads and converts `path`.
pub fn convert_file(path: &Path, dtype: DType) -> Result<Converted> {
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    // SAFETY: read-only private mapping; every range read from it is bounds-checked in `parse`.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
    let g = GgufFile::parse(path, &map)?;
    convert(&g, &map, dtype)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn f16b(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn q8_0_block() {
        let mut b = f16b(0.5).to_vec();
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let mut out = Vec::new();
        dequantize(GgmlType::Q8_0, &b, &mut out);
        assert_eq!(out.len(), 32);
        assert_eq!(out[0], -8.0);
        assert_eq!(out[31], 7.5);
    }

    #[test]
    fn q4_0_and_q4_1_blocks() {
        // Byte j holds element j (low nibble) and element j+16 (high nibble).
        let qs: Vec<u8> = (0..16).map(|j| (j as u8) | (((15 - j) as u8) << 4)).collect();
        let mut b = f16b(2.0).to_vec();
        b.extend(&qs);
        let mut out = Vec::new();
        dequantize(GgmlType::Q4_0, &b, &mut out);
        assert_eq!(out[0], (0.0 - 8.0) * 2.0);
        assert_eq!(out[3], (3.0 - 8.0) * 2.0);
        assert_eq!(out[16], (15.0 - 8.0) * 2.0);
        assert_eq!(out[31], (0.0 - 8.0) * 2.0);
        let mut b = f16b(0.25).to_vec();
        b.extend(f16b(-1.0));
        b.extend(&qs);
        out.clear();
        dequantize(GgmlType::Q4_1, &b, &mut out);
        assert_eq!(out[5], 5.0 * 0.25 - 1.0);
        assert_eq!(out[17], 14.0 * 0.25 - 1.0);
    }

    #[test]
    fn q5_blocks_use_high_bits() {
        let mut b = f16b(1.0).to_vec();
        b.extend(f16b(0.0));
        b.extend((1u32 | (1 << 16)).to_le_bytes()); // high bit set for elements 0 and 16
        b.extend([0x21u8; 16]);
        let mut out = Vec::new();
        dequantize(GgmlType::Q5_1, &b, &mut out);
        assert_eq!(out[0], 17.0);
        assert_eq!(out[1], 1.0);
        assert_eq!(out[16], 18.0);
        assert_eq!(out[17], 2.0);
        let mut b = f16b(1.0).to_vec();
        b.extend(0u32.to_le_bytes());
        b.extend([0u8; 16]);
        out.clear();
        dequantize(GgmlType::Q5_0, &b, &mut out);
        assert!(out.iter().all(|&x| x == -16.0));
    }

    #[test]
    fn float_types() {
        let mut out = Vec::new();
        dequantize(GgmlType::F32, &1.5f32.to_le_bytes(), &mut out);
        dequantize(GgmlType::F16, &f16b(-2.0), &mut out);
        dequantize(GgmlType::BF16, &half::bf16::from_f32(3.0).to_le_bytes(), &mut out);
        assert_eq!(out, vec![1.5, -2.0, 3.0]);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: reshape(heads, 2, hd/2, cols).swapaxes(1, 2) → row (h, i, p) ← (h, p, i).
        let (heads, hd, cols) = (2, 4, 1);
        let hf: Vec<f32> = (0..heads * hd).map(|x| x as f32).collect();
        let mut gg = vec![0f32; hf.len()];
        for h in 0..heads {
            for p in 0..2 {
                for i in 0..hd / 2 {
                    gg[h * hd + 2 * i + p] = hf[h * hd + p * hd / 2 + i];
                }
            }
        }
        assert_eq!(unpermute_rows(&gg, heads * hd, cols, heads), hf);
    }

    fn push_str(b: &mut Vec<u8>, s: &str) {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    }

    #[test]
    fn malformed_files_are_errors() {
        let p = Path::new("x.gguf");
        assert!(GgufFile::parse(p, b"GGML").is_err());
        assert!(GgufFile::parse(p, b"GGUF\x03\0\0\0").is_err());
        // Absurd counts.
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(u64::MAX.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        assert!(GgufFile::parse(p, &b).unwrap_err().to_string().contains("exceeds"));
        // A tensor whose data lies past the end.
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        push_str(&mut b, "t");
        b.extend(1u32.to_le_bytes());
        b.extend(64u64.to_le_bytes());
        b.extend(0u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        let e = GgufFile::parse(p, &b).unwrap_err().to_string();
        assert!(e.contains("outside the file") && e.contains("x.gguf"), "{e}");
        b.resize(b.len().next_multiple_of(32) + 256, 0);
        let g = GgufFile::parse(p, &b).unwrap();
        assert_eq!(g.tensors[0].dims, vec![64]);
    }
}
