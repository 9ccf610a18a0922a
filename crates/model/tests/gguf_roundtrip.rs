//! GGUF import end to end: a reference checkpoint written as GGUF the way llama.cpp's converter
//! writes it (q/k rows permuted into interleaved pairs, dimensions innermost first, F32 and F16
//! tensors), converted back in memory and on disk, must still match transformers' logits.

use std::path::PathBuf;
use std::sync::Arc;

use djinn_backend::cpu::CpuBackend;
use djinn_model::gguf::writer::{gguf_name, permute_rows};
use djinn_model::testing::{argmax, read_reference, reference_root};
use djinn_model::{open_model, Engine, EngineOptions};
use safetensors::SafeTensors;

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

fn kv_u32(b: &mut Vec<u8>, k: &str, v: u32) {
    put_str(b, k);
    b.extend(4u32.to_le_bytes());
    b.extend(v.to_le_bytes());
}

fn kv_f32(b: &mut Vec<u8>, k: &str, v: f32) {
    put_str(b, k);
    b.extend(6u32.to_le_bytes());
    b.extend(v.to_le_bytes());
}

fn write_gguf(path: &PathBuf) {
    let dir = reference_root().join("llama-gqa");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut meta = Vec::new();
    put_str(&mut meta, "general.architecture");
    meta.extend(8u32.to_le_bytes());
    put_str(&mut meta, "llama");
    for (k, v) in [
        ("llama.block_count", 2),
        ("llama.context_length", 64),
        ("llama.embedding_length", 64),
        ("llama.feed_forward_length", 96),
        ("llama.attention.head_count", 4),
        ("llama.attention.head_count_kv", 2),
        ("tokenizer.ggml.eos_token_id", 2),
    ] {
        kv_u32(&mut meta, k, v);
    }
    kv_f32(&mut meta, "llama.attention.layer_norm_rms_epsilon", 1e-5);
    kv_f32(&mut meta, "llama.rope.freq_base", 10000.0);
    let (mut infos, mut data) = (Vec::new(), Vec::new());
    for (i, n) in names.iter().enumerate() {
        let t = st.tensor(n).unwrap();
        let shape = t.shape().to_vec();
        let mut f: Vec<f32> = t.data().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        if n.ends_with("q_proj.weight") {
            f = permute_rows(&f, shape[0], shape[1], 4);
        } else if n.ends_with("k_proj.weight") {
            f = permute_rows(&f, shape[0], shape[1], 2);
        }
        // Alternate F32 and F16 storage to cover both paths (F16 rounds: checked loosely below).
        let f16 = i % 2 == 1 && shape.len() == 1;
        put_str(&mut infos, &gguf_name(n).unwrap());
        infos.extend((shape.len() as u32).to_le_bytes());
        for d in shape.iter().rev() {
            infos.extend((*d as u64).to_le_bytes());
        }
        infos.extend((if f16 { 1u32 } else { 0 }).to_le_bytes());
        infos.extend((data.len() as u64).to_le_bytes());
        for x in &f {
            if f16 {
                data.extend(half::f16::from_f32(*x).to_le_bytes());
            } else {
                data.extend(x.to_le_bytes());
            }
        }
        data.resize(data.len().next_multiple_of(32), 0);
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((names.len() as u64).to_le_bytes());
    out.extend(10u64.to_le_bytes());
    out.extend(meta);
    out.extend(infos);
    out.resize(out.len().next_multiple_of(32), 0);
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

#[test]
fn gguf_import_reproduces_transformers_logits() {
    let tmp = std::env::temp_dir().join(format!("djinn-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let file = tmp.join("llama-gqa.gguf");
    write_gguf(&file);
    let reference = read_reference(&reference_root().join("llama-gqa")).unwrap();
    // In memory (what `--model-dir x.gguf` does) and through a written directory.
    let conv =
        djinn_model::gguf::convert_file(&file, djinn_model::gguf::Tensors::Dequantize(djinn_backend::DType::F32))
            .unwrap();
    conv.write_dir(&tmp.join("hf")).unwrap();
    for src in [file.clone(), tmp.join("hf")] {
        let files = open_model(&src, None).unwrap();
        let be = Arc::new(CpuBackend::with_threads(1).unwrap());
        let opts = EngineOptions { all_logits: true, max_step_tokens: 64, ..EngineOptions::default() };
        let mut eng = Engine::from_checkpoint(be, &files.checkpoint, files.cfg, &opts).unwrap();
        for case in &reference.cases {
            let sid = eng.open_session().unwrap();
            let mut logits = Vec::new();
            eng.prefill(sid, &case.prompt, true, &mut logits).unwrap();
            for (row, want) in logits.chunks(128).zip(&case.logits) {
                let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
                let err = row.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                // Some norm weights went through f16: a little looser than the 1e-3 of f32.
                assert!(err <= 5e-3 * scale, "{}: {err} vs {scale}", src.display());
                assert_eq!(argmax(row), argmax(want));
            }
            eng.close_session(sid).unwrap();
        }
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}
