//! Every backend against Hugging Face transformers (float32) on the committed reference
//! checkpoints (`tests/data/models/*`, made by `scripts/make_reference.py`). One body, one trial
//! per (backend, model):
//! - `cpu::<model>`: logits within 1e-3 · max|logit| at every prompt position, the same argmax
//!   everywhere, identical greedy continuations (single sequences and a ragged batch).
//! - `cuda::<model>` (feature `cuda`): the same prompts on GPU 0, logits within 1e-2 · max|logit|
//!   (GPU reductions and math intrinsics differ from the CPU's in the last bits, and TF32/f16
//!   paths may be used), the same argmax at every position and the same greedy tokens. Without a
//!   GPU or driver the trials are reported as ignored at run time, with the reason on stderr.
//! - `<kind>::<model>::kv_f16` / `kv_bf16`: the same with a 16-bit KV cache (what a GPU
//!   serves with), end to end through the model: logits within `KV16_REL_TOL`, the same argmax
//!   and greedy tokens.

mod gpu;

use std::sync::Arc;

use djinn_backend::cpu::CpuBackend;
use djinn_backend::{Backend, DType};
use djinn_model::testing::{check_model, REFERENCE_MODELS};
use djinn_model::EngineOptions;
use libtest_mimic::{Arguments, Failed, Trial};

const CPU_REL_TOL: f32 = 1e-3;
const CUDA_REL_TOL: f32 = 1e-2;
/// With the KV cache stored as f16 or bf16 (bf16 keeps 8 mantissa bits: ~4e-3 per value).
const KV16_REL_TOL: f32 = 3e-2;

/// Every reference model, checked within `tol` of the largest logit.
struct Reference {
    tol: f32,
}

impl gpu::Suite for Reference {
    fn trials<B: Backend>(&self, kind: &str, backend: Result<Arc<B>, String>) -> Vec<Trial> {
        let kv_cases = [
            (DType::F32, "", self.tol),
            (DType::F16, "::kv_f16", KV16_REL_TOL),
            (DType::BF16, "::kv_bf16", KV16_REL_TOL),
        ];
        REFERENCE_MODELS
            .iter()
            .flat_map(|&name| kv_cases.iter().map(move |&(kv_dtype, suffix, tol)| (name, kv_dtype, suffix, tol)))
            .map(|(name, kv_dtype, suffix, tol)| {
                let name_kind = format!("{kind}::{name}{suffix}");
                let be = match &backend {
                    Ok(be) => be.clone(),
                    Err(why) => return gpu::ignored(name_kind, why),
                };
                let tol = if kv_dtype == DType::F32 { tol } else { tol.max(self.tol) };
                Trial::test(name_kind, move || {
                    let opts = EngineOptions { max_step_tokens: 64, kv_dtype, ..EngineOptions::default() };
                    let rep = check_model(be, name, &opts).map_err(|e| Failed::from(format!("{name}: {e}")))?;
                    if rep.max_rel_err > tol || rep.argmax_mismatches > 0 || rep.greedy_mismatches > 0 {
                        return Err(format!("{name} kv {kv_dtype}: {rep:?} (tolerance {tol})").into());
                    }
                    Ok(())
                })
            })
            .collect()
    }
}

fn main() {
    let args = Arguments::from_args();
    let cpu = CpuBackend::with_threads(2).map(Arc::new).map_err(|e| e.to_string());
    let mut all = gpu::Suite::trials(&Reference { tol: CPU_REL_TOL }, "cpu", cpu);
    all.extend(gpu::cuda_trials("model_reference", &Reference { tol: CUDA_REL_TOL }));
    libtest_mimic::run(&args, all).exit();
}
