//! Every backend against Hugging Face transformers (float32) on the committed reference
//! checkpoints (`tests/data/models/*`, made by `scripts/make_reference.py`). One body, one trial
//! per (backend, model):
//! - `cpu::<model>`: logits within 1e-3 · max|logit| at every prompt position, the same argmax
//!   everywhere, identical greedy continuations (single sequences and a ragged batch).
//! - `cuda::<model>` (feature `cuda`): the same prompts on GPU 0, logits within 1e-2 · max|logit|
//!   (GPU reductions and math intrinsics differ from the CPU's in the last bits, and TF32/f16
//!   paths may be used), the same argmax at every position and the same greedy tokens. Without a
//!   GPU or driver the trials are reported as ignored at run time, with the reason on stderr.

use std::sync::Arc;

use djinn_backend::cpu::CpuBackend;
use djinn_backend::Backend;
use djinn_model::testing::{check_model, REFERENCE_MODELS};
use djinn_model::EngineOptions;
use libtest_mimic::{Arguments, Failed, Trial};

const CPU_REL_TOL: f32 = 1e-3;
#[cfg(feature = "cuda")]
const CUDA_REL_TOL: f32 = 1e-2;

fn trials<B: Backend>(kind: &str, backend: Result<Arc<B>, String>, tol: f32) -> Vec<Trial> {
    REFERENCE_MODELS
        .iter()
        .map(|&name| {
            let be = backend.clone();
            let ignored = be.is_err();
            Trial::test(format!("{kind}::{name}"), move || {
                let be = be.map_err(Failed::from)?;
                let opts = EngineOptions { max_step_tokens: 64, ..EngineOptions::default() };
                let rep = check_model(be, name, &opts).map_err(|e| Failed::from(format!("{name}: {e}")))?;
                if rep.max_rel_err > tol || rep.argmax_mismatches > 0 || rep.greedy_mismatches > 0 {
                    return Err(format!("{name}: {rep:?} (tolerance {tol})").into());
                }
                Ok(())
            })
            .with_ignored_flag(ignored)
        })
        .collect()
}

fn main() {
    let args = Arguments::from_args();
    let cpu = CpuBackend::with_threads(2).map(Arc::new).map_err(|e| e.to_string());
    let mut all = trials::<CpuBackend>("cpu", cpu, CPU_REL_TOL);
    #[cfg(feature = "cuda")]
    {
        let cuda = djinn_dataplane::kernels::cuda_backend(0).map(Arc::new).map_err(|e| format!("no CUDA device: {e}"));
        if let Err(why) = &cuda {
            eprintln!("model_reference: cuda trials ignored: {why}");
        }
        all.extend(trials("cuda", cuda, CUDA_REL_TOL));
    }
    #[cfg(not(feature = "cuda"))]
    {
        let why = "built without the `cuda` feature".to_owned();
        eprintln!("model_reference: cuda trials ignored: {why}");
        all.extend(trials::<CpuBackend>("cuda", Err(why), 0.0));
    }
    libtest_mimic::run(&args, all).exit();
}
