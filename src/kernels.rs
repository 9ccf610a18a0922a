//! The GPU kernels of this build: `kernels/*.cu` compiled by `build.rs` into PTX plus sm_80 and
//! sm_90 cubins (or embedded as source for runtime NVRTC when the build had no compiler), handed
//! to the CUDA backend at start-up. The backend crate stays free of build logic; this module
//! only owns the blobs and the constructor that pairs them with a device.

#[cfg(feature = "cuda")]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Every kernel module, in every form the build produced.
#[cfg(feature = "cuda")]
pub use generated::KERNELS;

/// Opens GPU `ordinal` with this build's kernels. Without a driver or a GPU this returns
/// [`djinn_backend::BackendError::NoDevice`] (never panics).
#[cfg(feature = "cuda")]
pub fn cuda_backend(ordinal: usize) -> Result<djinn_backend::cuda::CudaBackend, djinn_backend::BackendError> {
    djinn_backend::cuda::CudaBackend::new(ordinal, &KERNELS)
}
