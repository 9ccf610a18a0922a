//! Broken checkpoints and bad requests: every problem is a typed error naming the file and the
//! tensor or value at fault, never a panic. Each test copies a committed reference model into a
//! private temporary directory and breaks one thing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use djinn_backend::cpu::CpuBackend;
use djinn_model::testing::reference_root;
use djinn_model::{open_model, Engine, EngineOptions, ModelError};
use safetensors::SafeTensors;

struct TempModel(PathBuf);

impl TempModel {
    fn new(tag: &str) -> TempModel {
        let dir = std::env::temp_dir().join(format!("djinn-model-err-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let src = reference_root().join("llama-gqa");
        for f in ["config.json", "generation_config.json", "model.safetensors"] {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
        TempModel(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    /// Rewrites model.safetensors through `edit(name, shape) -> Some((new_name, new_shape))`.
    fn rewrite(&self, edit: impl Fn(&str, &[usize]) -> Option<(String, Vec<usize>)>) {
        let file = self.0.join("model.safetensors");
        let bytes = std::fs::read(&file).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut kept: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, view) in st.iter() {
            if let Some((n, shape)) = edit(name, view.shape()) {
                let numel: usize = shape.iter().product();
                let mut data = view.data().to_vec();
                data.resize(numel * 4, 0);
                kept.push((n, view.dtype(), shape, data));
            }
        }
        let views: Vec<_> = kept
            .iter()
            .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &file).unwrap();
    }
    fn edit_config(&self, f: impl Fn(&mut serde_json::Value)) {
        let p = self.0.join("config.json");
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
    }
    fn load(&self) -> Result<Engine<CpuBackend>, ModelError> {
        let be = Arc::new(CpuBackend::with_threads(1).unwrap());
        Engine::load_dir(be, self.path(), &EngineOptions { max_step_tokens: 32, ..EngineOptions::default() })
    }
}

impl Drop for TempModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const UP: &str = "model.layers.1.mlp.up_proj.weight";

fn err_text(r: Result<Engine<CpuBackend>, ModelError>) -> (ModelError, String) {
    let e = r.err().expect("loading must fail");
    let s = e.to_string();
    (e, s)
}

#[test]
fn missing_tensor() {
    let m = TempModel::new("missing");
    m.rewrite(|n, s| (n != UP).then(|| (n.to_string(), s.to_vec())));
    let (e, s) = err_text(m.load());
    assert!(matches!(e, ModelError::MissingTensor { .. }), "{s}");
    assert!(s.contains(UP), "{s}");
}

#[test]
fn misnamed_tensor() {
    let m = TempModel::new("misnamed");
    m.rewrite(|n, s| Some((if n == UP { "model.layers.1.mlp.upproj.weight".into() } else { n.into() }, s.to_vec())));
    let (_, s) = err_text(m.load());
    assert!(s.contains("missing tensor") && s.contains(UP), "{s}");
}

#[test]
fn wrong_shape() {
    let m = TempModel::new("shape");
    m.rewrite(|n, s| Some((n.to_string(), if n == UP { vec![s[0] - 1, s[1]] } else { s.to_vec() })));
    let (e, s) = err_text(m.load());
    assert!(matches!(e, ModelError::Shape { .. }), "{s}");
    assert!(s.contains(UP) && s.contains("model.safetensors"), "{s}");
}

#[test]
fn truncated_file() {
    let m = TempModel::new("trunc");
    let f = m.path().join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let (e, s) = err_text(m.load());
    assert!(matches!(e, ModelError::Header { .. }), "{s}");
    assert!(s.contains("model.safetensors"), "{s}");
}

#[test]
fn unsupported_architecture_and_invalid_config() {
    let m = TempModel::new("arch");
    m.edit_config(|v| v["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]));
    let (e, s) = err_text(m.load());
    assert!(matches!(e, ModelError::Architecture { .. }) && s.contains("GPTNeoXForCausalLM"), "{s}");
    m.edit_config(|v| {
        v["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
        v["num_attention_heads"] = serde_json::json!("four");
    });
    let (_, s) = err_text(m.load());
    assert!(s.contains("num_attention_heads") && s.contains("config.json"), "{s}");
    std::fs::write(m.path().join("config.json"), b"{not json").unwrap();
    let (e, s) = err_text(m.load());
    assert!(matches!(e, ModelError::Json { .. }) && s.contains("config.json"), "{s}");
}

#[test]
fn bad_tokens_and_overlong_prompts() {
    let m = TempModel::new("tokens");
    let mut eng = m.load().unwrap();
    let sid = eng.open_session().unwrap();
    let mut out = Vec::new();
    let e = eng.prefill(sid, &[1, 2, 128], false, &mut out).unwrap_err();
    assert!(matches!(e, ModelError::TokenId { id: 128, vocab: 128 }), "{e}");
    // Nothing was appended by the refused step.
    assert_eq!(eng.session_tokens(sid).unwrap(), 0);
    let long = vec![5u32; 65];
    let e = eng.prefill(sid, &long, false, &mut out).unwrap_err();
    assert!(matches!(e, ModelError::TooLong { tokens: 65, max: 64 }), "{e}");
    eng.prefill(sid, &[5, 6, 7], false, &mut out).unwrap();
    assert_eq!(out.len(), 128);
}

#[test]
fn directory_without_tokenizer_serves_ids() {
    let m = TempModel::new("notok");
    std::fs::remove_file(m.path().join("generation_config.json")).unwrap();
    let files = open_model(m.path(), None).unwrap();
    assert!(files.tokenizer.is_none());
    assert_eq!(files.cfg.eos_token_ids, vec![2]);
}
