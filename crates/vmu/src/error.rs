//! Errors at the crate boundary ([`VmuError`]) and the small per-operation enums of the hot paths.

use djinn_backend::BackendError;

use crate::SessionId;

/// Failure of the offset allocator ([`crate::OffsetAllocator`]); no context, it is on the hot path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// No free range large enough (the region may still hold that many free bytes, fragmented).
    #[error("out of memory")]
    OutOfMemory,
    /// The bookkeeping pool (`max_allocations`, set at start-up) is exhausted.
    #[error("too many live allocations")]
    TooManyAllocations,
    /// Zero bytes, or an alignment that is not a power of two.
    #[error("invalid size or alignment")]
    Invalid,
}

/// The per-step scratch arena is full (its size is set at start-up; raise `scratch_bytes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("scratch arena full: {requested_bytes} bytes requested, {free_bytes} of {capacity_bytes} free")]
pub struct ScratchFull {
    pub requested_bytes: usize,
    pub free_bytes: usize,
    pub capacity_bytes: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum VmuError {
    #[error("backend: {0}")]
    Backend(#[from] BackendError),
    #[error("invalid VMU configuration: {0}")]
    Config(String),
    #[error("weights region: cannot allocate {bytes} bytes for model {model:?}: {source}")]
    Weights { model: String, bytes: usize, source: AllocError },
    #[error("persistent region: cannot allocate {bytes} bytes: {source}")]
    Persistent { bytes: usize, source: AllocError },
    #[error(transparent)]
    Scratch(#[from] ScratchFull),
    #[error("unknown or closed session {0}")]
    UnknownSession(SessionId),
    #[error("session table full: {max_sessions} sessions open")]
    TooManySessions { max_sessions: usize },
    /// Admission control: device KV and the host swap pool are both (nearly) full. Existing
    /// sessions keep their state; retry after some close.
    #[error(
        "admission refused: KV memory exhausted ({free_device_blocks} device blocks and {free_host_blocks} host swap \
         blocks free, {required_blocks} required)"
    )]
    AdmissionRefused { free_device_blocks: usize, free_host_blocks: usize, required_blocks: usize },
    /// Not enough KV blocks for this operation even after swapping out every session that may be
    /// swapped (those pinned for this step stay). Nothing was changed.
    #[error(
        "session {session}: out of KV memory: {needed_blocks} blocks needed, {free_device_blocks} free on device, \
         {free_host_blocks} free in the host swap pool, {pinned_sessions} sessions pinned"
    )]
    KvExhausted {
        session: SessionId,
        needed_blocks: usize,
        free_device_blocks: usize,
        free_host_blocks: usize,
        pinned_sessions: usize,
    },
    /// No room for a paused state: neither the device KV blocks nor the host swap pool can take
    /// `needed_bytes` more into the paused states' pool. Nothing was changed; retry when others
    /// resume or end.
    #[error(
        "session {session}: no room for its paused state of {needed_bytes} bytes: {free_device_blocks} KV blocks \
         free on device, {free_host_blocks} free in the host swap pool ({held_bytes} bytes held by it already)"
    )]
    PausedNoRoom {
        session: SessionId,
        needed_bytes: usize,
        free_device_blocks: usize,
        free_host_blocks: usize,
        held_bytes: usize,
    },
    #[error("session {0} is swapped out: call ensure_resident first")]
    NotResident(SessionId),
    #[error("session {session}: context full ({tokens} + {append} tokens > max {max_tokens})")]
    ContextFull { session: SessionId, tokens: usize, append: usize, max_tokens: usize },
}
