//! The CUDA half of a test binary's trials (shared by backend_ops, vmu_conformance and
//! model_reference): open GPU 0 once and run the suite there, or — without the `cuda` feature, a
//! GPU or a driver — report every one of its trials as ignored with the reason, on stderr and in
//! the trial, never as passed.

use std::sync::Arc;

use djinn_backend::Backend;
use libtest_mimic::{Completion, Trial};

/// A suite whose trials can be made for any backend; `Err` = ignore them, with the reason.
#[allow(dead_code)] // each test binary uses its own subset of this module
pub trait Suite {
    fn trials<B: Backend>(&self, kind: &str, backend: Result<Arc<B>, String>) -> Vec<Trial>;
}

/// `suite`'s trials under the `cuda::` prefix, on GPU 0 when it opens.
#[allow(dead_code)]
pub fn cuda_trials(binary: &str, suite: &impl Suite) -> Vec<Trial> {
    #[cfg(feature = "cuda")]
    let cuda = djinn_dataplane::kernels::cuda_backend(0).map(Arc::new).map_err(|e| format!("no CUDA device: {e}"));
    #[cfg(not(feature = "cuda"))]
    let cuda: Result<Arc<djinn_backend::cpu::CpuBackend>, String> = Err("built without the `cuda` feature".to_owned());
    if let Err(why) = &cuda {
        eprintln!("{binary}: cuda trials ignored: {why}");
    }
    // The kernel emulator (kernels/emu, scripts/cuda-emu) is not a GPU: its trials are named
    // `cuda-emu::`, so no log can count them as CUDA passes.
    #[cfg(feature = "cuda")]
    if let Ok(be) = &cuda {
        if djinn_backend::Backend::info(&**be).name.contains(EMULATOR) {
            eprintln!("{binary}: cuda trials run on the kernel emulator (the CPU), named cuda-emu::");
            return suite.trials("cuda-emu", cuda);
        }
    }
    suite.trials("cuda", cuda)
}

/// What the kernel emulator's device name contains (kernels/emu/driver.cpp).
#[allow(dead_code)]
pub const EMULATOR: &str = "cuda-emu";

/// Whether GPU 0 opens with this build's kernels — `Ok(true)` when it is the kernel emulator,
/// not a GPU; `Err` says why not (no `cuda` feature, no driver, no device).
#[allow(dead_code)] // each test binary uses its own subset of this module
pub fn probe() -> Result<bool, String> {
    #[cfg(feature = "cuda")]
    return djinn_dataplane::kernels::cuda_backend(0)
        .map(|be| djinn_backend::Backend::info(&be).name.contains(EMULATOR))
        .map_err(|e| format!("no CUDA device: {e}"));
    #[cfg(not(feature = "cuda"))]
    Err("built without the `cuda` feature".to_owned())
}

/// A trial reported as ignored with `why` (libtest-mimic prints the reason).
pub fn ignored(name: String, why: &str) -> Trial {
    let why = why.to_owned();
    Trial::ignorable_test(name, move || Ok(Completion::ignored_with(why)))
}
