//! djinn-dataplane: the binary's library half (CLI plumbing, the kernels compiled by build.rs, and
//! the benchmark cores shared by the CLI's `bench` commands and `cargo bench`).

pub mod blind;
pub mod kernels;
pub mod npy;
pub mod overhead;
pub mod serve_child;

#[cfg(feature = "cuda")]
pub use kernels::cuda_backend;
