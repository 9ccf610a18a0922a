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

use std::sync::Arc;

use djinn_backend::cpu::CpuBackend;
use djinn_backend::Backend;
use libtest_mimic::{Arguments, Completion, Failed, Trial};

fn trials<B: Backend>(prefix: &str, backend: Result<Arc<B>, String>) -> Vec<Trial> {
    bodies::bodies::<B>()
        .into_iter()
        .map(|(name, body)| {
            let name = format!("{prefix}::{name}");
            match &backend {
                Ok(be) => {
                    let be = be.clone();
                    Trial::test(name, move || body(be).map_err(Failed::from))
                }
                Err(why) => {
                    let why = why.clone();
                    Trial::ignorable_test(name, move || Ok(Completion::ignored_with(why)))
                }
            }
        })
        .collect()
}

fn main() {
    let args = Arguments::from_args();
    let cpu = Arc::new(CpuBackend::new().expect("cpu backend"));
    let mut all = trials::<CpuBackend>("cpu", Ok(cpu));
    #[cfg(feature = "cuda")]
    {
        let cuda = djinn_dataplane::kernels::cuda_backend(0).map(Arc::new).map_err(|e| format!("no CUDA device: {e}"));
        if let Err(why) = &cuda {
            eprintln!("vmu_conformance: cuda trials ignored: {why}");
        }
        all.extend(trials("cuda", cuda));
    }
    #[cfg(not(feature = "cuda"))]
    {
        let why = "built without the `cuda` feature".to_owned();
        eprintln!("vmu_conformance: cuda trials ignored: {why}");
        all.extend(trials::<CpuBackend>("cuda", Err(why)));
    }
    libtest_mimic::run(&args, all).exit();
}
