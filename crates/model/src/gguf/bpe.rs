//! tokenizer.json for a GGUF's byte-level BPE vocabulary (the "gpt2" tokenizer model).

use serde_json::{json, Value};

use super::reader::{GgufFile, GgufValue};
use crate::error::Result;

/// tokenizer.json for a byte-level BPE vocabulary (the "gpt2" GGUF tokenizer model).
pub(super) fn bpe_tokenizer(g: &GgufFile, toks: &[GgufValue]) -> Result<Value> {
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
