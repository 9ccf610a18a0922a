//! djinn-dataplane: the binary's library half (CLI plumbing and the kernels compiled by build.rs).

pub mod blind;
pub mod kernels;
pub mod npy;

#[cfg(feature = "cuda")]
pub use kernels::cuda_backend;
