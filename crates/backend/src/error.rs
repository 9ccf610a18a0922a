use crate::DType;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("no usable device: {0}")]
    NoDevice(String),
    #[error("backend not compiled in: {0}")]
    NotCompiled(&'static str),
    #[error("out of device memory reserving {bytes} bytes")]
    OutOfMemory { bytes: usize },
    #[error("{op}: operand {operand} [{offset}, +{bytes}) lies outside its region of {region_bytes} bytes")]
    OutOfBounds { op: &'static str, operand: &'static str, offset: usize, bytes: usize, region_bytes: usize },
    #[error("{op}: operand {operand} has dtype {got}, expected {expected}")]
    DType { op: &'static str, operand: &'static str, got: DType, expected: &'static str },
    #[error("{op}: shape mismatch: {why}")]
    Shape { op: &'static str, why: String },
    #[error("{op}: output overlaps input {operand}")]
    Overlap { op: &'static str, operand: &'static str },
    #[error("{op}: unsupported: {why}")]
    Unsupported { op: &'static str, why: String },
    #[error("driver error in {op}: {msg}")]
    Driver { op: &'static str, msg: String },
    /// A handle's stream was used by two threads at once (a program error: give each user its
    /// own handle with `Backend::handle`).
    #[error(
        "{op}: the stream is in use by another thread; each thread needs its own backend handle (Backend::handle)"
    )]
    StreamShared { op: &'static str },
    #[error("kernel build/load failed for {module}: {msg}")]
    Kernel { module: String, msg: String },
}

pub type Result<T> = std::result::Result<T, BackendError>;
