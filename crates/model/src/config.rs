//! `config.json` (and `generation_config.json`) of a Llama-family checkpoint, validated.
//!
//! Invariants after [`ModelConfig::parse`]: every dimension is non-zero, `heads` is a multiple of
//! `kv_heads`, `head_dim` is even, the activation is SiLU and the RoPE variant is one we compute
//! exactly (default, linear, llama3). Both the older `rope_theta`/`rope_scaling` keys and the
//! newer `rope_parameters` object are accepted.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{ModelError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// How RoPE frequencies are scaled (folded into the inverse-frequency table on the host).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    Linear { factor: f64 },
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2 always; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Bias on gate/up/down (Llama with `mlp_bias`).
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    /// Every id that ends generation (config.json and generation_config.json merged).
    pub eos_token_ids: Vec<u32>,
    /// `torch_dtype` / `dtype` as written, if any.
    pub stored_dtype: Option<String>,
}

fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

fn req_usize(v: &Value, key: &str, path: &Path) -> Result<usize> {
    let x = get(v, key).ok_or_else(|| ModelError::config(path, key, "missing"))?;
    let n = x.as_u64().ok_or_else(|| ModelError::config(path, key, format!("expected a positive integer, got {x}")))?;
    if n == 0 || n > (1 << 40) {
        return Err(ModelError::config(path, key, format!("out of range: {n}")));
    }
    Ok(n as usize)
}

fn opt_usize(v: &Value, key: &str, path: &Path) -> Result<Option<usize>> {
    match get(v, key) {
        None => Ok(None),
        Some(_) => req_usize(v, key, path).map(Some),
    }
}

fn opt_f64(v: &Value, key: &str, path: &Path) -> Result<Option<f64>> {
    match get(v, key) {
        None => Ok(None),
        Some(x) => {
            let f = x.as_f64().ok_or_else(|| ModelError::config(path, key, format!("expected a number, got {x}")))?;
            if !f.is_finite() {
                return Err(ModelError::config(path, key, "not finite"));
            }
            Ok(Some(f))
        }
    }
}

fn opt_bool(v: &Value, key: &str, path: &Path) -> Result<Option<bool>> {
    match get(v, key) {
        None => Ok(None),
        Some(x) => {
            x.as_bool().map(Some).ok_or_else(|| ModelError::config(path, key, format!("expected a bool, got {x}")))
        }
    }
}

/// `eos_token_id` may be an integer or a list of integers.
pub(crate) fn token_ids(v: &Value, key: &str, path: &Path) -> Result<Vec<u32>> {
    let bad = |x: &Value| ModelError::config(path, key, format!("expected a token id or list of ids, got {x}"));
    match get(v, key) {
        None => Ok(Vec::new()),
        Some(Value::Array(xs)) => xs
            .iter()
            .map(|x| x.as_u64().filter(|&n| n <= u32::MAX as u64).map(|n| n as u32).ok_or_else(|| bad(x)))
            .collect(),
        Some(x) => Ok(vec![x.as_u64().filter(|&n| n <= u32::MAX as u64).ok_or_else(|| bad(x))? as u32]),
    }
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| ModelError::Json { path: path.to_path_buf(), msg: e.to_string() })
}

impl ModelConfig {
    /// Reads `dir/config.json` and, when present, `dir/generation_config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let v = read_json(&path)?;
        let mut cfg = Self::parse(&v, &path)?;
        let gen_path = dir.join("generation_config.json");
        if gen_path.exists() {
            let g = read_json(&gen_path)?;
            for id in token_ids(&g, "eos_token_id", &gen_path)? {
                if !cfg.eos_token_ids.contains(&id) {
                    cfg.eos_token_ids.push(id);
                }
            }
            if cfg.bos_token_id.is_none() {
                cfg.bos_token_id = token_ids(&g, "bos_token_id", &gen_path)?.first().copied();
            }
        }
        Ok(cfg)
    }

    pub fn parse(v: &Value, path: &Path) -> Result<Self> {
        let path: PathBuf = path.to_path_buf();
        let path = path.as_path();
        if !v.is_object() {
            return Err(ModelError::config(path, "<root>", "expected a JSON object"));
        }
        let arch_name = match get(v, "architectures") {
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => a[0].as_str().unwrap_or("").to_string(),
            Some(x) => return Err(ModelError::config(path, "architectures", format!("expected one name, got {x}"))),
            None => match get(v, "model_type").and_then(Value::as_str) {
                Some("llama") => "LlamaForCausalLM".into(),
                Some("mistral") => "MistralForCausalLM".into(),
                Some("qwen2") => "Qwen2ForCausalLM".into(),
                _ => return Err(ModelError::config(path, "architectures", "missing")),
            },
        };
        let arch = match arch_name.as_str() {
            "LlamaForCausalLM" => Architecture::Llama,
            "MistralForCausalLM" => Architecture::Mistral,
            "Qwen2ForCausalLM" => Architecture::Qwen2,
            _ => return Err(ModelError::Architecture { path: path.to_path_buf(), arch: arch_name }),
        };
        let hidden_size = req_usize(v, "hidden_size", path)?;
        let heads = req_usize(v, "num_attention_heads", path)?;
        let kv_heads = opt_usize(v, "num_key_value_heads", path)?.unwrap_or(heads);
        if heads % kv_heads != 0 {
            return Err(ModelError::config(
                path,
                "num_key_value_heads",
                format!("{kv_heads} does not divide num_attention_heads {heads}"),
            ));
        }
        let head_dim = match opt_usize(v, "head_dim", path)? {
            Some(d) => d,
            None => {
                if hidden_size % heads != 0 {
                    return Err(ModelError::config(path, "hidden_size", "not a multiple of num_attention_heads"));
                }
                hidden_size / heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(ModelError::config(path, "head_dim", format!("{head_dim} is odd (RoPE needs pairs)")));
        }
        let act = get(v, "hidden_act").and_then(Value::as_str).unwrap_or("silu");
        if act != "silu" {
            return Err(ModelError::config(path, "hidden_act", format!("{act:?} unsupported (only silu)")));
        }
        let rms_norm_eps = opt_f64(v, "rms_norm_eps", path)?.unwrap_or(1e-6);
        if rms_norm_eps <= 0.0 {
            return Err(ModelError::config(path, "rms_norm_eps", "must be positive"));
        }

        // RoPE: `rope_parameters` (newer) takes precedence over `rope_theta` + `rope_scaling`.
        let (rope_obj, rope_key) = match get(v, "rope_parameters") {
            Some(p) => (Some(p), "rope_parameters"),
            None => (get(v, "rope_scaling"), "rope_scaling"),
        };
        let mut rope_theta = opt_f64(v, "rope_theta", path)?;
        let mut rope_scaling = RopeScaling::None;
        if let Some(p) = rope_obj {
            if !p.is_object() {
                return Err(ModelError::config(path, rope_key, "expected an object"));
            }
            if let Some(t) = opt_f64(p, "rope_theta", path)? {
                rope_theta = Some(t);
            }
            let kind = get(p, "rope_type").or_else(|| get(p, "type")).and_then(Value::as_str).unwrap_or("default");
            let factor = |p: &Value| -> Result<f64> {
                let f = opt_f64(p, "factor", path)?
                    .ok_or_else(|| ModelError::config(path, &format!("{rope_key}.factor"), "missing"))?;
                if f <= 0.0 {
                    return Err(ModelError::config(path, &format!("{rope_key}.factor"), "must be positive"));
                }
                Ok(f)
            };
            rope_scaling = match kind {
                "default" => RopeScaling::None,
                "linear" => RopeScaling::Linear { factor: factor(p)? },
                "llama3" => {
                    let need = |k: &str| -> Result<f64> {
                        opt_f64(p, k, path)?
                            .ok_or_else(|| ModelError::config(path, &format!("{rope_key}.{k}"), "missing"))
                    };
                    let (lo, hi) = (need("low_freq_factor")?, need("high_freq_factor")?);
                    if hi <= lo {
                        return Err(ModelError::config(path, rope_key, "high_freq_factor must exceed low_freq_factor"));
                    }
                    RopeScaling::Llama3 {
                        factor: factor(p)?,
                        low_freq_factor: lo,
                        high_freq_factor: hi,
                        original_max_position_embeddings: need("original_max_position_embeddings")?,
                    }
                }
                other => {
                    return Err(ModelError::config(path, rope_key, format!("rope type {other:?} unsupported")));
                }
            };
        }
        let rope_theta = rope_theta.unwrap_or(10000.0);
        if rope_theta <= 1.0 {
            return Err(ModelError::config(path, "rope_theta", format!("{rope_theta} must exceed 1")));
        }

        let mut max_position_embeddings = opt_usize(v, "max_position_embeddings", path)?.unwrap_or(2048);
        // Sliding-window attention only differs from full attention past the window: cap the
        // context there rather than compute something else.
        let sliding = match arch {
            Architecture::Mistral => opt_usize(v, "sliding_window", path)?,
            Architecture::Qwen2 if opt_bool(v, "use_sliding_window", path)?.unwrap_or(false) => {
                opt_usize(v, "sliding_window", path)?
            }
            _ => None,
        };
        if let Some(w) = sliding {
            max_position_embeddings = max_position_embeddings.min(w);
        }

        let attention_bias = opt_bool(v, "attention_bias", path)?.unwrap_or(false);
        let (qkv_bias, o_bias) = match arch {
            Architecture::Qwen2 => (true, false),
            Architecture::Llama => (attention_bias, attention_bias),
            Architecture::Mistral => (false, false),
        };
        let mlp_bias = arch == Architecture::Llama && opt_bool(v, "mlp_bias", path)?.unwrap_or(false);
        let vocab_size = req_usize(v, "vocab_size", path)?;
        if vocab_size > i32::MAX as usize {
            return Err(ModelError::config(path, "vocab_size", "exceeds i32 token ids"));
        }
        let bos_token_id = token_ids(v, "bos_token_id", path)?.first().copied();
        let eos_token_ids = token_ids(v, "eos_token_id", path)?;
        let stored_dtype = get(v, "torch_dtype").or_else(|| get(v, "dtype")).and_then(Value::as_str).map(String::from);
        Ok(ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: req_usize(v, "intermediate_size", path)?,
            layers: req_usize(v, "num_hidden_layers", path)?,
            heads,
            kv_heads,
            head_dim,
            rms_norm_eps: rms_norm_eps as f32,
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings: opt_bool(v, "tie_word_embeddings", path)?.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            bos_token_id,
            eos_token_ids,
            stored_dtype,
        })
    }

    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// RoPE inverse frequencies `[head_dim / 2]`, computed as transformers does (float32
    /// exponent, then scaling), so the table the device reads is the one the reference used.
    pub fn inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim;
        let mut out: Vec<f32> = (0..dim / 2)
            .map(|i| {
                let exponent = ((2 * i) as f32) / (dim as f32);
                (1.0f64 / self.rope_theta.powf(exponent as f64)) as f32
            })
            .collect();
        match self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => out.iter_mut().for_each(|f| *f = (*f as f64 / factor) as f32),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let old = original_max_position_embeddings;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                for f in out.iter_mut() {
                    let inv = *f as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / inv;
                    let scaled = if wavelen > low_wavelen { inv / factor } else { inv };
                    // wavelen is finite (inv > 0), so the negated comparisons of transformers are plain ones.
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    *f = if medium {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        ((1.0 - smooth) * scaled / factor + smooth * scaled) as f32
                    } else {
                        scaled as f32
                    };
                }
            }
        }
        out
    }

    /// Rejects ids outside the vocabulary and sequences past the position limit.
    pub fn check_tokens(&self, ids: &[u32], start_pos: usize) -> Result<()> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(ModelError::TokenId { id, vocab: self.vocab_size });
        }
        if start_pos + ids.len() > self.max_position_embeddings {
            return Err(ModelError::TooLong { tokens: start_pos + ids.len(), max: self.max_position_embeddings });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 128, "eos_token_id": [2, 3]
        })
    }

    fn parse(v: &Value) -> Result<ModelConfig> {
        ModelConfig::parse(v, Path::new("x/config.json"))
    }

    #[test]
    fn parses_llama_gqa() {
        let c = parse(&base()).unwrap();
        assert_eq!((c.head_dim, c.kv_heads, c.eos_token_ids.clone()), (16, 2, vec![2, 3]));
        assert_eq!(c.inv_freq().len(), 8);
        assert_eq!(c.inv_freq()[0], 1.0);
    }

    #[test]
    fn rejects_bad_values_naming_them() {
        let mut v = base();
        v["architectures"] = json!(["GPT2LMHeadModel"]);
        assert!(matches!(parse(&v), Err(ModelError::Architecture { .. })));
        let mut v = base();
        v["num_key_value_heads"] = json!(3);
        let e = parse(&v).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads") && e.contains("x/config.json"), "{e}");
        let mut v = base();
        v["hidden_size"] = json!("big");
        assert!(parse(&v).unwrap_err().to_string().contains("hidden_size"));
        let mut v = base();
        v.as_object_mut().unwrap().remove("vocab_size");
        assert!(parse(&v).unwrap_err().to_string().contains("vocab_size"));
        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        assert!(parse(&v).unwrap_err().to_string().contains("yarn"));
        let mut v = base();
        v["hidden_act"] = json!("gelu");
        assert!(parse(&v).unwrap_err().to_string().contains("hidden_act"));
    }

    #[test]
    fn llama3_scaling_matches_reference_shape() {
        let mut v = base();
        v["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32});
        let c = parse(&v).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        let plain = ModelConfig { rope_scaling: RopeScaling::None, ..c.clone() }.inv_freq();
        let scaled = c.inv_freq();
        // High frequencies untouched, the lowest divided by the factor.
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[7] - plain[7] / 8.0).abs() < 1e-12);
    }

    #[test]
    fn token_checks() {
        let c = parse(&base()).unwrap();
        assert!(matches!(c.check_tokens(&[1, 100], 0), Err(ModelError::TokenId { id: 100, .. })));
        assert!(matches!(c.check_tokens(&[1], 128), Err(ModelError::TooLong { .. })));
        c.check_tokens(&[1, 99], 0).unwrap();
    }
}
