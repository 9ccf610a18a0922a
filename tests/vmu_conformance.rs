//! VMU conformance (libtest-mimic, `harness = false`): the same generic bodies
//! (`crates/vmu/tests/common/bodies.rs`) on every backend — `cpu::<body>` and `cuda::<body>`
//! (feature `cuda`). Without a GPU or driver the cuda trials are reported as ignored at run time
//! with the reason, never as passed.
//!
//! Bodies: the acceptance scenario (eight sessions, KV capacity for about two, contents
//! bit-identical, capacity never exceeded, swaps in the metrics), proptest interleavings of
//! open/append/fork/swap-out/swap-in/close (`DJINN_VMU_PROPTEST_CASES`, default 48), admission
//! control, copy-on-write forks, shared weights, and the staging (gather/scatter) swap path.

#[path = "../crates/vmu/tests/common/bodies.rs"]
mod bodies;
mod gpu;

use std::sync::Arc;

use djinn_backend::cpu::CpuBackend;
use djinn_backend::Backend;
use libtest_mimic::{Arguments, Failed, Trial};

/// The VMU suite (generic bodies).
struct Vmu;

impl gpu::Suite for Vmu {
    fn trials<B: Backend>(&self, kind: &str, backend: Result<Arc<B>, String>) -> Vec<Trial> {
        bodies::bodies::<B>()
            .into_iter()
            .map(|(name, body)| {
                let name = format!("{kind}::{name}");
                match &backend {
                    Ok(be) => {
                        let be = be.clone();
                        // Trials run in parallel: each on a handle of its own.
                        Trial::test(name, move || {
                            let be = be.handle().map_err(|e| Failed::from(format!("handle: {e}")))?;
                            body(be).map_err(Failed::from)
                        })
                    }
                    Err(why) => gpu::ignored(name, why),
                }
            })
            .collect()
    }
}

fn main() {
    let args = Arguments::from_args();
    let cpu = Arc::new(CpuBackend::new().expect("cpu backend"));
    let mut all = gpu::Suite::trials(&Vmu, "cpu", Ok(cpu));
    all.extend(gpu::cuda_trials("vmu_conformance", &Vmu));
    libtest_mimic::run(&args, all).exit();
}
