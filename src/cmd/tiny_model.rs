//! A tiny Llama-family model with deterministic pseudo-random weights, a character-level
//! tokenizer and a ChatML-style chat template, written as a Hugging Face layout directory
//! (config.json, model.safetensors, tokenizer.json, tokenizer_config.json). The demo serves it
//! when it runs offline: its text is noise, but every byte and microsecond of the data plane is
//! the real thing. Nothing here is downloaded; the same seed always writes the same files.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

/// Shape of the generated model (small enough to write in milliseconds, large enough that a step
/// is a real forward pass).
const VOCAB: usize = 128;
const HIDDEN: usize = 64;
const INTERMEDIATE: usize = 128;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const CONTEXT_TOKENS_MAX: usize = 2048;

/// Special token ids (the rest of the low ASCII range is unused filler).
const UNK_ID: usize = 0;
const IM_START_ID: usize = 1;
const IM_END_ID: usize = 2;

/// splitmix64: a tiny, well-mixed deterministic generator (no dependency needed for noise).
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-scale, scale).
    fn uniform(&mut self, scale: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        (unit * 2.0 - 1.0) * scale
    }
}

/// The token string of every id: specials, printable ASCII and newline as themselves, filler
/// for the rest (never produced by encoding text).
fn vocab_tokens() -> Vec<String> {
    (0..VOCAB)
        .map(|id| match id {
            UNK_ID => "<unk>".to_owned(),
            IM_START_ID => "<|im_start|>".to_owned(),
            IM_END_ID => "<|im_end|>".to_owned(),
            10 => "\n".to_owned(),
            32..=126 => char::from(id as u8).to_string(),
            _ => format!("<x{id}>"),
        })
        .collect()
}

/// Whether the model should ever pick `id`: printable text, newline, or the end of a turn.
fn emits_text(id: usize) -> bool {
    matches!(id, IM_END_ID | 10 | 32..=126)
}

fn tokenizer_json() -> serde_json::Value {
    let tokens = vocab_tokens();
    let vocab: serde_json::Map<String, serde_json::Value> =
        tokens.iter().enumerate().map(|(id, t)| (t.clone(), serde_json::json!(id))).collect();
    let added: Vec<serde_json::Value> = [UNK_ID, IM_START_ID, IM_END_ID]
        .iter()
        .map(|&id| {
            serde_json::json!({"id": id, "content": tokens[id], "single_word": false, "lstrip": false,
                               "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
}

fn config_json() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "bos_token_id": IM_START_ID,
        "eos_token_id": IM_END_ID,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": CONTEXT_TOKENS_MAX,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "torch_dtype": "float32",
        "vocab_size": VOCAB
    })
}

/// Every tensor's name and shape, in file order.
fn tensor_shapes() -> Vec<(String, Vec<usize>)> {
    let kv = KV_HEADS * HEAD_DIM;
    let mut t = vec![("model.embed_tokens.weight".to_owned(), vec![VOCAB, HIDDEN])];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        t.push((format!("{p}.input_layernorm.weight"), vec![HIDDEN]));
        t.push((format!("{p}.self_attn.q_proj.weight"), vec![HIDDEN, HIDDEN]));
        t.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, HIDDEN]));
        t.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, HIDDEN]));
        t.push((format!("{p}.self_attn.o_proj.weight"), vec![HIDDEN, HIDDEN]));
        t.push((format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN]));
        t.push((format!("{p}.mlp.gate_proj.weight"), vec![INTERMEDIATE, HIDDEN]));
        t.push((format!("{p}.mlp.up_proj.weight"), vec![INTERMEDIATE, HIDDEN]));
        t.push((format!("{p}.mlp.down_proj.weight"), vec![HIDDEN, INTERMEDIATE]));
    }
    t.push(("model.norm.weight".to_owned(), vec![HIDDEN]));
    t.push(("lm_head.weight".to_owned(), vec![VOCAB, HIDDEN]));
    t
}

/// model.safetensors: an 8-byte header length, the JSON header, then f32 little-endian data.
fn write_safetensors(path: &Path, seed: u64) -> anyhow::Result<()> {
    let shapes = tensor_shapes();
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    for (name, shape) in &shapes {
        let bytes = shape.iter().product::<usize>() * 4;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut head = serde_json::to_vec(&header)?;
    // The data starts 8-byte aligned, as writers conventionally pad it.
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let mut rng = SplitMix(seed);
    let mut data = Vec::with_capacity(offset);
    for (name, shape) in &shapes {
        let n: usize = shape.iter().product();
        let norm = name.ends_with("layernorm.weight") || name == "model.norm.weight";
        // Norm gains near 1; other weights scaled like a default init (≈ 1/sqrt(fan_in)).
        let scale = 1.0 / (*shape.last().unwrap_or(&1) as f32).sqrt();
        let lm_head = name == "lm_head.weight";
        for i in 0..n {
            let mut v = if norm { 1.0 + rng.uniform(0.1) } else { rng.uniform(scale * 1.7) };
            // Zero logits for ids that are not text (filler, <unk>, <|im_start|>): greedy noise
            // then prints as characters instead of placeholders.
            if lm_head && !emits_text(i / HIDDEN) {
                v = 0.0;
            }
            data.extend_from_slice(&v.to_le_bytes());
        }
    }
    let mut f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(&(head.len() as u64).to_le_bytes())?;
    f.write_all(&head)?;
    f.write_all(&data)?;
    Ok(())
}

/// Writes the model into `dir` (created if needed).
pub fn write(dir: &Path, seed: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let put = |name: &str, v: &serde_json::Value| -> anyhow::Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, serde_json::to_vec_pretty(v)?).with_context(|| format!("writing {}", p.display()))
    };
    put("config.json", &config_json())?;
    put("tokenizer.json", &tokenizer_json())?;
    put(
        "tokenizer_config.json",
        &serde_json::json!({
            "bos_token": null,
            "eos_token": "<|im_end|>",
            "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        }),
    )?;
    write_safetensors(&dir.join("model.safetensors"), seed)
}

#[cfg(test)]
mod tests {
    // `super::` paths instead of imports: tests/session_cli.rs includes this file too, where the
    // harness-less build drops #[test] functions and an import would be unused.
    #[test]
    fn the_generated_model_loads_tokenizes_and_runs() {
        let dir = std::env::temp_dir().join(format!("djinn-tiny-test-{}", std::process::id()));
        super::write(&dir, 7).unwrap();
        let tok = djinn_model::TextTokenizer::load(&dir).unwrap().expect("tokenizer");
        let ids = tok.encode(&tok.apply_chat("Hi there").unwrap(), false).unwrap();
        assert_eq!(ids[0], super::IM_START_ID as u32);
        assert_eq!(tok.decode(&ids, false).unwrap(), "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(tok.eos_id(), Some(super::IM_END_ID as u32));
        // Its Fuse decoder streams from a byte table (the engine loop's fast token path).
        let mut d = djinn_model::Detokenizer::new();
        assert!(tok.byte_table().is_some());
        assert_eq!(
            ids.iter().map(|&id| d.push(&tok, id).unwrap().to_owned()).collect::<String>(),
            "user\nHi there\nassistant\n"
        );
        let be = std::sync::Arc::new(djinn_backend::cpu::CpuBackend::with_threads(1).unwrap());
        let mut eng = djinn_model::Engine::load_dir(be, &dir, &djinn_model::EngineOptions::default()).unwrap();
        let sid = eng.open_session().unwrap();
        let mut logits = Vec::new();
        eng.prefill(sid, &ids, false, &mut logits).unwrap();
        assert_eq!(logits.len(), super::VOCAB);
        assert!(logits.iter().all(|x| x.is_finite()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
