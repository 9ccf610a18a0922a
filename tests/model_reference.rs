//! Every backend against Hugging Face transformers (float32) on the committed reference
//! checkpoints (`tests/data/models/*`, made by `scripts/make_reference.py`). One body, one trial
//! per (backend, model):
//! - `cpu::<model>`: logits within 1e-3 · max|logit| at every prompt position, the same argmax
//!   everywhere, identical greedy continuations (single sequences and a ragged batch).
//! - `cuda::<model>` (feature `cuda`): the same prompts on GPU 0, logits within 1e-2 · max|logit|
//!   (GPU reductions and math intrinsics differ from the CPU's in the last bits, and TF32/f16
//!   paths may be used), the same argmax at every position and the same greedy tokens. Without a
//!   GPU or driver the trials are reported as ignored at run time, with the reason on stderr.

mod gpu;

use std::sync::Arc;

use djinn_backend::cpu::CpuBackend;
use djinn_backend::Backend;
use djinn_model::testing::{check_model, REFERENCE_MODELS};
use djinn_model::EngineOptions;
use libtest_mimic::{Arguments, Failed, Trial};

const CPU_REL_TOL: f32 = 1e-3;
const CUDA_REL_TOL: f32 = 1e-2;

/// Every reference model, checked within `tol` of the largest logit.
struct Reference {
    tol: f32,
}

impl gpu::Suite for Reference {
    fn trials<B: Backend>(&self, kind: &str, backend: Result<Arc<B>, String>) -> Vec<Trial> {
        let tol = self.tol;
        REFERENCE_MODELS
            .iter()
            .map(|&name| {
                let name_kind = format!("{kind}::{name}");
                let be = match &backend {
                    Ok(be) => be.clone(),
                    Err(why) => return gpu::ignored(name_kind, why),
                };
                Trial::test(name_kind, move || {
                    let opts = EngineOptions { max_step_tokens: 64, ..EngineOptions::default() };
                    let rep = check_model(be, name, &opts).map_err(|e| Failed::from(format!("{name}: {e}")))?;
                    if rep.max_rel_err > tol || rep.argmax_mismatches > 0 || rep.greedy_mismatches > 0 {
                        return Err(format!("{name}: {rep:?} (tolerance {tol})").into());
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
