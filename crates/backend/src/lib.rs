//! Compute backends. One trait ([`Backend`], in `backend.rs`) over reserved device memory and
//! streams; implementations are siblings: `cpu` (the reference, always built) and `cuda`
//! (feature `cuda`; cudarc with dynamic loading, kernels handed in by the binary at start-up).
//!
//! Memory is addressed by typed offsets into a [`Backend::Region`] reserved once — never by raw
//! pointers — so the VMU can own every byte and a handle means the same thing on every backend.

pub mod backend;
pub mod dtype;
pub mod error;
pub mod kv;
pub mod quant;
pub mod validate;

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

pub use backend::{
    sample_uniform, AttnBatch, Backend, BinaryOp, DeviceInfo, DmaBuf, GemmArgs, HostBuf, KvCacheRef, RegionInfo,
    SampleParams, UnaryOp, View,
};
pub use dtype::DType;
pub use error::BackendError;
pub use kv::KvLayout;
pub use quant::QuantType;
