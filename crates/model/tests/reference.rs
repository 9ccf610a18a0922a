//! CPU backend against transformers (float32) on the committed reference checkpoints: logits
//! within 1e-3 of the largest logit at every position, the same argmax everywhere, identical
//! greedy continuations (single sequences and a ragged batch). The CUDA instantiation of the
//! same body lives in the root package's `tests/model_reference.rs`.

use std::sync::Arc;

use djinn_backend::cpu::CpuBackend;
use djinn_backend::DType;
use djinn_model::testing::{check_model, REFERENCE_MODELS};
use djinn_model::EngineOptions;

const REL_TOL: f32 = 1e-3;

fn run(name: &str, opts: &EngineOptions, tol: f32) {
    let be = Arc::new(CpuBackend::with_threads(2).expect("cpu backend"));
    let rep = check_model(be, name, opts).unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!("{name}: {rep:?}");
    assert!(rep.max_rel_err <= tol, "{name}: max relative logit error {} > {tol}", rep.max_rel_err);
    assert_eq!(rep.argmax_mismatches, 0, "{name}: argmax differs");
    assert_eq!(rep.greedy_mismatches, 0, "{name}: greedy continuation differs");
}

#[test]
fn cpu_f32_matches_transformers() {
    for name in REFERENCE_MODELS {
        run(name, &EngineOptions { max_step_tokens: 64, ..EngineOptions::default() }, REL_TOL);
    }
}

/// Small step limits force chunked prefill across KV blocks: the numbers must not change.
#[test]
fn cpu_chunked_prefill_matches() {
    run("llama-gqa", &EngineOptions { max_step_tokens: 7, block_tokens: 4, ..EngineOptions::default() }, REL_TOL);
}

/// bf16 weights (the CPU widens them inside the GEMV): looser logits, same argmax and greedy.
#[test]
fn cpu_bf16_weights_close() {
    let opts = EngineOptions { dtype: Some(DType::BF16), max_step_tokens: 64, ..EngineOptions::default() };
    let be = Arc::new(CpuBackend::with_threads(2).expect("cpu backend"));
    let rep = check_model(be, "llama-gqa", &opts).unwrap();
    eprintln!("bf16: {rep:?}");
    assert!(rep.max_rel_err < 3e-2, "{rep:?}");
    assert_eq!(rep.argmax_mismatches, 0, "{rep:?}");
    assert_eq!(rep.greedy_mismatches, 0, "{rep:?}");
}
