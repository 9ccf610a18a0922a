//! The VMU conformance bodies on the CPU backend (the root `tests/vmu_conformance.rs` runs the
//! same bodies on CPU and CUDA).

mod common {
    pub mod bodies;
}

use std::sync::Arc;

use djinn_backend::cpu::CpuBackend;

macro_rules! cpu_tests {
    ($($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            let be = Arc::new(CpuBackend::with_threads(1).expect("cpu backend"));
            common::bodies::$name(be).unwrap_or_else(|e| panic!("{}: {e}", stringify!($name)));
        }
    )*};
}

cpu_tests!(
    acceptance_eight_sessions,
    random_interleavings,
    admission_control,
    fork_copy_on_write,
    weights_shared,
    gather_path,
);

#[test]
fn every_body_is_instantiated() {
    assert_eq!(common::bodies::bodies::<CpuBackend>().len(), 6);
}

#[test]
fn vmu_is_send() {
    fn send<T: Send>() {}
    send::<djinn_vmu::Vmu<CpuBackend>>();
}
