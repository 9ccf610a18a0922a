//! Breakpoints against Hugging Face transformers (float32) on the committed 4-layer reference
//! checkpoint (`tests/data/models/llama-deep/breakpoints.json`, made by
//! `scripts/make_reference.py`). One body per backend (`djinn_model::testing::check_breakpoints`):
//! - the hidden state after every layer N is transformers' `hidden_states[N]` (N < L; the input
//!   of the final norm for N = L) within `HIDDEN_REL_TOL` of its largest value;
//! - resuming with the states read continues to transformers' greedy tokens;
//! - resuming with a recorded replacement at layer N gives what transformers gives when a forward
//!   hook on `model.model.layers[N-1]` returns it: logits within the backend's tolerance, the
//!   same argmax at every position and the same greedy tokens.
//!
//! CUDA trials (feature `cuda`) are reported as ignored without a GPU, with the reason.

mod gpu;

use std::sync::Arc;

use djinn_backend::cpu::CpuBackend;
use djinn_backend::Backend;
use djinn_model::testing::check_breakpoints;
use djinn_model::EngineOptions;
use libtest_mimic::{Arguments, Failed, Trial};

/// Hidden states, relative to their largest value (the bound for f32 weights).
const HIDDEN_REL_TOL: f32 = 1e-4;
/// Logits, as in tests/model_reference.rs.
const CPU_REL_TOL: f32 = 1e-3;
const CUDA_REL_TOL: f32 = 1e-2;

struct Breakpoints {
    hidden_tol: f32,
    logits_tol: f32,
}

impl gpu::Suite for Breakpoints {
    fn trials<B: Backend>(&self, kind: &str, backend: Result<Arc<B>, String>) -> Vec<Trial> {
        let name = format!("{kind}::breakpoints");
        let be = match backend {
            Ok(be) => be,
            Err(why) => return vec![gpu::ignored(name, &why)],
        };
        let (hidden_tol, logits_tol) = (self.hidden_tol, self.logits_tol);
        vec![Trial::test(name, move || {
            let opts = EngineOptions { max_step_tokens: 64, ..EngineOptions::default() };
            let rep = check_breakpoints(be, &opts).map_err(|e| Failed::from(e.to_string()))?;
            eprintln!("{rep:?}");
            if rep.hidden_max_rel_err > hidden_tol
                || rep.patched_max_rel_err > logits_tol
                || rep.argmax_mismatches > 0
                || rep.greedy_mismatches > 0
            {
                return Err(format!("{rep:?} (tolerances: hidden {hidden_tol}, logits {logits_tol})").into());
            }
            Ok(())
        })]
    }
}

fn main() {
    let args = Arguments::from_args();
    let cpu = CpuBackend::with_threads(2).map(Arc::new).map_err(|e| e.to_string());
    let mut all = gpu::Suite::trials(&Breakpoints { hidden_tol: HIDDEN_REL_TOL, logits_tol: CPU_REL_TOL }, "cpu", cpu);
    // GPU reductions differ in the last bits; the hidden-state bound scales with the logits'.
    let cuda = Breakpoints { hidden_tol: HIDDEN_REL_TOL * 10.0, logits_tol: CUDA_REL_TOL };
    all.extend(gpu::cuda_trials("breakpoint_reference", &cuda));
    libtest_mimic::run(&args, all).exit();
}
